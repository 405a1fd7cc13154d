"""Under torchrun: extraction, compare and DDP match one process; a lost rank stops all; heads scale."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, run_cli, write_image_folder
from safetensors import safe_open

from xferkit.backbones import create_backbone
from xferkit.core import distributed
from xferkit.core.errors import XferkitError
from xferkit.features import extract as extract_module
from xferkit.features import extract_features
from xferkit.features.cache import verify_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder_with_bad_files(tmp_path) -> Path:
    """Three colour classes with an unreadable file in the first and in the last class (both shards)."""
    root = write_image_folder(tmp_path / "data", per_class=6)
    (root / "blue" / "0-broken.png").write_bytes(b"not an image")
    (root / "red" / "zz-empty.png").write_bytes(b"")
    return root


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", **extra}


def _torchrun(*args) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (as ``python -m torch.distributed.run``)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", *map(str, args)], env=_env(), capture_output=True, text=True, timeout=300)


def test_without_torchrun_every_helper_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.world_size() == 1 and distributed.is_main() and not distributed.init()
    assert distributed.all_gather_objects("x") == ["x"] and distributed.broadcast_object(3) == 3
    assert distributed.shard(7) == range(7)


def test_shards_are_contiguous_balanced_and_cover_everything(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    shards = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        shards.append(distributed.shard(10))
    assert [i for s in shards for i in s] == list(range(10))
    assert {len(s) for s in shards} == {3, 4}


def test_ranks_features_are_assembled_in_input_order(monkeypatch, folder_with_bad_files):
    """Two simulated ranks (their all_gather answered by hand) give what one process gives."""
    paths = sorted(p for p in folder_with_bad_files.rglob("*") if p.is_file())
    backbone = create_backbone(TINY_BACKBONE, pretrained=False)
    single = extract_features(backbone, paths, workers=0, cache=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(extract_module, "init", lambda: True)
    local = []
    for rank in range(2):  # each rank's own part, as it would send it
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setattr(extract_module, "all_gather_objects", lambda obj: local.append(obj) or [obj, obj])
        extract_features(backbone, paths, workers=0, cache=False)
    assert [len(part[0]) for part in local] == [len(paths) // 2 - 1, len(paths) - len(paths) // 2 - 1]
    monkeypatch.setattr(extract_module, "all_gather_objects", lambda obj: local)
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        both = extract_features(backbone, paths, workers=0, cache=False)
        np.testing.assert_allclose(both.features, single.features, rtol=1e-4, atol=1e-5)
        assert both.kept.tolist() == single.kept.tolist()
        assert both.skipped == single.skipped and len(both.skipped) == 2
        with pytest.raises(XferkitError, match="0-broken.png.*2 unreadable"):  # every rank: the same error
            extract_features(backbone, paths, workers=0, cache=False, strict=True)


@pytest.mark.slow
def test_torchrun_extraction_matches_one_process(tmp_path, folder_with_bad_files):
    """``torchrun --nproc-per-node 2 -m xferkit extract`` writes one process's features, rows and skips."""
    one = tmp_path / "one.safetensors"
    single = json.loads(run_cli("extract", folder_with_bad_files, "--backbone", TINY_BACKBONE,
                                "--no-pretrained", "-o", one, "--no-cache", "--json").stdout)
    two = tmp_path / "two.safetensors"
    done = _torchrun("-m", "xferkit", "extract", folder_with_bad_files, "--backbone", TINY_BACKBONE,
                     "--no-pretrained", "-o", two, "--json")
    assert done.returncode == 0, done.stderr
    both = json.loads(done.stdout)  # only rank 0 printed: one JSON document
    assert both["skipped"] == single["skipped"] and len(both["skipped"]) == 2
    with safe_open(one, "numpy") as a, safe_open(two, "numpy") as b:
        assert a.metadata()["paths"] == b.metadata()["paths"]
        np.testing.assert_allclose(a.get_tensor("features"), b.get_tensor("features"), rtol=1e-4, atol=1e-5)
        assert (a.get_tensor("labels") == b.get_tensor("labels")).all()
    assert verify_cache(Path(os.environ["XFERKIT_CACHE"])) == (2, 0)  # one shard a rank, both valid


#: Rank 1 joins the group, then stops answering at its first collective (the test kills it there).
STALLING_RANK = """
import os, sys, time
from pathlib import Path
from xferkit.core import distributed
from xferkit.features import extract

def stall(obj):
    distributed.init()
    Path(sys.argv[1]).touch()
    time.sleep(600)

if distributed.rank() == 1:
    extract.all_gather_objects = stall
from xferkit.cli import app
app(sys.argv[2:], prog_name="xferkit")
"""


@pytest.mark.slow
def test_a_killed_rank_stops_every_rank_without_a_model(tmp_path, folder_with_bad_files):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script, marker, output = tmp_path / "rank.py", tmp_path / "stalled", tmp_path / "model"
    script.write_text(STALLING_RANK)
    command = [sys.executable, script, marker, "repurpose", folder_with_bad_files, "--backbone",
               TINY_BACKBONE, "--no-pretrained", "-o", output]
    ranks = [subprocess.Popen(list(map(str, command)), stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_PORT=str(port),
                                       MASTER_ADDR="127.0.0.1", XFERKIT_DIST_TIMEOUT="60")) for r in range(2)]
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].communicate()[1]
        time.sleep(0.2)
    ranks[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = ranks[0].communicate(timeout=90)
    assert time.monotonic() - killed < 60  # well within the collective timeout
    assert ranks[0].returncode != 0 and ranks[1].wait() != 0
    assert stderr.count("error:") == 1 and "another rank failed" in stderr and "Traceback" not in stderr
    assert not output.exists() and not list(tmp_path.glob(".model*"))  # no model folder, no leftovers
    checked, dropped = verify_cache(Path(os.environ["XFERKIT_CACHE"]))
    assert checked >= 1 and dropped == 0  # rank 0's shard is there and valid: a re-run resumes from it


def _features(n=480, dim=24, n_classes=3, seed=0):
    """Overlapping classes through correlated, shifted, unevenly scaled channels (like CNN features)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    latent = rng.normal(0, 0.7, (n_classes, 6))[y] + rng.normal(0, 1, (n, 6))
    X = np.abs(latent @ rng.normal(0, 1, (6, dim)) + rng.normal(0, 0.1, (n, dim))) * rng.uniform(0.1, 5, dim)
    return X.astype(np.float32), y


def _objective(head, X, y) -> float:
    """scikit-learn's multinomial objective of a fitted LogisticHead, in float64."""
    Z = head._standardised(X) @ head.coef_.T + head.intercept_
    Z -= Z.max(axis=1, keepdims=True)
    nll = np.log(np.exp(Z).sum(axis=1)) - Z[np.arange(len(y)), y]
    return nll.mean() + (head.coef_ ** 2).sum() / (2 * head.C_ * len(y))


def test_chunked_objective_and_gradient_are_the_in_memory_ones():
    from xferkit.heads._lbfgs import _Chunks, _Problems

    X, y = _features()
    W = torch.from_numpy(np.random.default_rng(1).normal(0, 0.1, (2, X.shape[1] + 1, 3)).astype(np.float32))
    lam = torch.tensor([1e-3, 1e-1], dtype=torch.float64)
    whole = _Problems(_Chunks(torch.from_numpy(X), torch.device("cpu")), torch.from_numpy(y), 3)
    chunked = _Problems(_Chunks(X, torch.device("cpu"), chunk_rows=37), torch.from_numpy(y), 3)
    (f1, g1), (f2, g2) = whole.evaluate(W, lam), chunked.evaluate(W, lam)
    np.testing.assert_allclose(f2.numpy(), f1.numpy(), rtol=1e-6)
    np.testing.assert_allclose(g2.numpy(), g1.numpy(), rtol=1e-4, atol=1e-7)


def test_chunks_of_a_subset_are_its_rows_in_order():
    """A held-out part is read in the chunks' one pass: positions count the subset's rows, in order."""
    from xferkit.heads._lbfgs import standardised_chunks

    X = np.arange(60, dtype=np.float32).reshape(20, 3)
    subset = np.array([0, 4, 5, 6, 19])
    for rows in (X, torch.from_numpy(X)):
        chunks = list(standardised_chunks(rows, np.ones(3), np.full(3, 2.0), chunk_rows=5, subset=subset))
        assert [start for start, _ in chunks] == [0, 2, 4]  # rows 10-14 hold none of them: no chunk
        np.testing.assert_array_equal(torch.cat([c for _, c in chunks]).numpy(), (X[subset] - 1) / 2)


def test_streamed_fit_of_a_memory_map_reaches_the_in_memory_objective(tmp_path):
    from xferkit.heads import LogisticHead

    X, y = _features(n=240)
    np.save(tmp_path / "X.npy", X)
    mapped = np.load(tmp_path / "X.npy", mmap_mode="r")
    in_memory = LogisticHead(C=1.0, solver="torch").fit(X, y)
    streamed = LogisticHead(C=1.0).fit_streamed(mapped, y, chunk_rows=80)
    np.testing.assert_allclose(streamed.mean_, in_memory.mean_, rtol=1e-6)
    np.testing.assert_allclose(streamed.scale_, in_memory.scale_, rtol=1e-6)
    reached, reference = _objective(streamed, X, y), _objective(in_memory, X, y)
    assert abs(reached - reference) <= 1e-6 * reference
    assert (streamed.predict(X) == in_memory.predict(X)).mean() > 0.99


#: Each rank fits its own half of the rows, sharded; rank 0 saves the coefficients it got.
SHARDED_FIT = """
import sys
import numpy as np
import torch
from xferkit.core import distributed
from xferkit.heads import LogisticHead

X, y = np.load(sys.argv[1], mmap_mode="r"), np.load(sys.argv[2])
part = distributed.shard(len(y))
head = LogisticHead(C=1.0).fit_streamed(X[part.start:part.stop], y[part.start:part.stop], chunk_rows=50,
                                        sharded=True)
every = distributed.all_gather_objects(head.coef_)
if distributed.is_main():
    same = all((c == every[0]).all() for c in every)
    np.savez(sys.argv[3], coef=head.coef_, intercept=head.intercept_, same=same)
"""


@pytest.mark.slow
def test_sharded_fit_under_torchrun_reaches_the_single_process_objective(tmp_path):
    from xferkit.heads import LogisticHead

    X, y = _features()
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "fit.py").write_text(SHARDED_FIT)
    done = _torchrun(tmp_path / "fit.py", tmp_path / "X.npy", tmp_path / "y.npy", tmp_path / "out.npz")
    assert done.returncode == 0, done.stderr
    result = np.load(tmp_path / "out.npz")
    assert result["same"]  # every rank took the same steps
    single = LogisticHead(C=1.0, solver="torch").fit(X, y)
    sharded = LogisticHead(C=1.0).fit_streamed(X, y)  # for its fitted statistics; the weights replaced next
    sharded.coef_, sharded.intercept_ = result["coef"], result["intercept"]
    reached, reference = _objective(sharded, X, y), _objective(single, X, y)
    assert abs(reached - reference) <= 1e-6 * reference


@pytest.mark.slow
def test_ddp_finetune_on_two_ranks_learns_like_one_process_and_loads_in_one(tmp_path, split_folder):
    """Same global batch on 2 gloo ranks and on 1 process: both learn the colours; the model loads in one."""
    train = ["--head", "finetune", "--backbone", TINY_BACKBONE, "--no-pretrained", "--image-size", "32",
             "--epochs", "8", "--batch-size", "8", "--workers", "0", "--learning-rate", "0.01"]
    run_cli("repurpose", split_folder, *train, "-o", tmp_path / "one")
    done = _torchrun("-m", "xferkit", "repurpose", split_folder, *train, "-o", tmp_path / "two", "--json")
    assert done.returncode == 0, done.stderr
    history = json.loads((tmp_path / "two" / "head.json").read_text())["info"]["history"]
    assert history["batch_size"] == 8 and history["epochs_run"] >= 5  # the global batch; the second half
    accuracy = [json.loads(run_cli("evaluate", tmp_path / name, split_folder / "test", "--json").stdout)
                ["metrics"]["accuracy"] for name in ("one", "two")]
    assert min(accuracy) >= 0.8 and abs(accuracy[0] - accuracy[1]) <= 0.2, accuracy


@pytest.mark.slow
def test_lr_scale_benchmark_runs_end_to_end(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import lr_scale

    result = lr_scale.main(["--rows", "3000", "--dim", "16", "--classes", "3", "--chunk-rows", "700",
                            "--data", str(tmp_path / "X.npy"), "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == result
    assert result["peak_rss_mb"] >= result["peak_rss_mb_before_fit"] > 0 and result["iterations"] > 0
    assert result["train_accuracy_sample"] > 0.6 and not (tmp_path / "X.npy").exists()


def test_tune_refuses_torchrun_and_says_to_run_it_in_one_process(monkeypatch, tmp_path):
    import xferkit

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(XferkitError, match="tune runs in one process: run it without torchrun"):
        xferkit.tune(tmp_path / "data", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_step_that_fails_on_one_rank_fails_on_every_rank(monkeypatch):
    """The other ranks' outcomes (their all_gather answered by hand) decide this rank's."""
    assert distributed.raise_together(lambda: 7) == 7  # one process: the step itself
    with pytest.raises(ZeroDivisionError):
        distributed.raise_together(lambda: 1 / 0)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj: [obj, "rank 1: OSError: disk full"])
    with pytest.raises(XferkitError, match="rank 1: OSError: disk full"):
        distributed.raise_together(lambda: 7)


#: What compare writes, each file once (the heads' model folders come on top).
COMPARE_OUTPUTS = {"report.json", "test.csv", "reliability.png", "accuracy_vs_fit_time.png"}
COMPARE = ["--backbone", TINY_BACKBONE, "--no-pretrained", "--image-size", "32", "--workers", "0",
           "--epochs", "2", "--batch-size", "8", "--json"]


def test_compare_off_rank_0_writes_nothing(monkeypatch, tmp_path):
    """A rank other than 0 runs the whole comparison but leaves no file: rank 0 writes them."""
    from xferkit.api import comparison

    data = write_image_folder(tmp_path / "data", per_class=12)
    monkeypatch.setattr(comparison, "is_main", lambda: False)
    tiny = comparison.BackboneOptions(TINY_BACKBONE, pretrained=False, image_size=32)
    result = comparison.compare(data, backbone=tiny, heads=["lr"], output=tmp_path / "cmp",
                                options=comparison.ExtractOptions(workers=0))
    assert [row.status for row in result.rows] == ["ok"] and result.rows[0].metrics["accuracy"] > 0.9
    assert result.sizes["test"] == 6 and not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_torchrun_compare_gives_one_process_table_and_writes_once(tmp_path):
    """2 ranks: the feature heads score as in one process, finetune trains with DDP; one set of outputs."""
    data = write_image_folder(tmp_path / "data", per_class=12)
    heads = ["--heads", "lr,gp,finetune"]
    single = json.loads(run_cli("compare", data, "-o", tmp_path / "one", *COMPARE, *heads).stdout)
    done = _torchrun("-m", "xferkit", "compare", data, "-o", tmp_path / "two", *COMPARE, *heads)
    assert done.returncode == 0, done.stderr
    both = json.loads(done.stdout)  # only rank 0 printed: one JSON document
    assert json.loads((tmp_path / "two" / "report.json").read_text()) == both
    rows = {row["head"]: row for row in both["heads"]}
    assert all(row["status"] == "ok" for row in rows.values()), both["heads"]
    for row in single["heads"]:
        if row["head"] != "finetune":  # feature heads: the same features, so the same fit and scores
            for key in ("accuracy", "macro_f1", "nll", "ece", "brier"):
                got = rows[row["head"]][key]
                assert got == pytest.approx(row[key], rel=1e-3, abs=1e-4), (row["head"], key)
    assert rows["finetune"]["n_test"] == single["heads"][2]["n_test"] == both["split"]["test"] == 6
    assert "2 torchrun processes" in " ".join(both["notes"])
    written = {p.name for p in (tmp_path / "two").iterdir()}
    assert written == COMPARE_OUTPUTS | {"lr", "gp", "finetune"}  # no second copy, no temporary leftovers
    assert (tmp_path / "two" / "test.csv").read_text() == (tmp_path / "one" / "test.csv").read_text()
    for name in ("lr", "finetune"):  # the saved models load and predict in one process
        scored = json.loads(run_cli("evaluate", tmp_path / "two" / name, tmp_path / "two" / "test.csv",
                                    "--workers", "0", "--json").stdout)
        assert scored["metrics"]["accuracy"] == pytest.approx(rows[name]["accuracy"])


def test_sync_batchnorm_converts_in_place_keeping_what_trains_and_what_saves():
    """Every batch norm becomes SyncBatchNorm with the same parameter objects (the optimiser's) and keys."""
    from torch import nn

    from xferkit.finetune import loop
    from xferkit.finetune.network import ImageClassifier

    network = ImageClassifier(create_backbone(TINY_BACKBONE, pretrained=False).model, 3)
    params, keys = list(network.parameters()), set(network.learned_state())
    norms = [name for name, m in network.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    loop.synchronise_batchnorm(network, torch.device("cuda"))  # a device name: nothing runs on it here
    assert all(isinstance(network.get_submodule(name), nn.SyncBatchNorm) for name in norms)
    assert not any(type(m) is nn.BatchNorm2d for m in network.modules())
    assert all(a is b for a, b in zip(network.parameters(), params, strict=True))
    assert set(network.learned_state()) == keys


def test_sync_batchnorm_is_refused_on_the_cpu_before_training(monkeypatch, tmp_path):
    """``--set finetune.sync_batchnorm=true`` reaches the loop, which refuses it on the CPU under torchrun."""
    from xferkit.finetune import FinetuneClassifier, loop
    from xferkit.model.registry import parse_settings

    settings = parse_settings(["finetune.sync_batchnorm=true", "scratch.sync_batchnorm=yes"])
    assert settings == {"finetune": {"sync_batchnorm": True}, "scratch": {"sync_batchnorm": True}}
    data = write_image_folder(tmp_path / "data", per_class=4)
    paths = sorted(data.rglob("*.png"))
    monkeypatch.setattr(loop, "init", lambda: True)  # as under torchrun, without a process group
    monkeypatch.setattr(loop, "DistributedDataParallel", lambda *a, **k: pytest.fail("wrapped on the CPU"))
    trainer = FinetuneClassifier(TINY_BACKBONE, pretrained=False, image_size=32, epochs=1, device="cpu",
                                 workers=0, **settings["finetune"])
    with pytest.raises(XferkitError, match="sync_batchnorm=True needs GPUs.*does not run on the CPU"):
        trainer.fit(paths, [p.parent.name for p in paths])


def test_a_pixel_model_saved_before_sync_batchnorm_existed_still_loads(tmp_path):
    from xferkit.finetune import FinetuneClassifier, PixelClassifier

    data = write_image_folder(tmp_path / "data", per_class=4)
    paths = sorted(data.rglob("*.png"))
    trainer = FinetuneClassifier(TINY_BACKBONE, pretrained=False, image_size=32, epochs=1, device="cpu",
                                 workers=0, random_state=0).fit(paths, [p.parent.name for p in paths])
    trainer.save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "head.json").read_text())
    del manifest["params"]["sync_batchnorm"]  # as an earlier version wrote it
    (tmp_path / "model" / "head.json").write_text(json.dumps(manifest))
    loaded = PixelClassifier.load(tmp_path / "model")
    assert loaded.get_params() == trainer.get_params() and loaded.sync_batchnorm is False
    np.testing.assert_allclose(loaded.predict_proba(paths[:3]), trainer.predict_proba(paths[:3]), atol=1e-5)


def test_gp_places_inducing_points_by_kmeans_on_a_seeded_sample(monkeypatch):
    """Beyond KMEANS_ROWS rows k-means sees a sample (the same for the same seed); below, every row."""
    from xferkit.heads import GPHead
    from xferkit.heads import gp as gp_module

    seen = []

    class Recording(gp_module.KMeans):
        def fit(self, X, y=None, sample_weight=None):
            seen.append(np.array(X))
            return super().fit(X)

    monkeypatch.setattr(gp_module, "KMeans", Recording)
    monkeypatch.setattr(gp_module, "KMEANS_ROWS", 100)
    Z = torch.from_numpy(_features(n=300, dim=8)[0])

    def inducing(m: int, rows: torch.Tensor, seed: int = 0) -> torch.Tensor:
        head = GPHead("svgp", inducing=m)
        head.seed_ = seed
        return head._kmeans(rows)

    first, again = inducing(10, Z), inducing(10, Z)
    assert [len(points) for points in seen] == [100, 100] and np.array_equal(seen[0], seen[1])
    assert first.shape == (10, 8) and torch.equal(first, again)
    assert len(np.unique(seen[0], axis=0)) == 100  # distinct rows of Z, no repeats
    inducing(10, Z, seed=1)
    assert not np.array_equal(seen[-1], seen[0])  # another seed, another sample
    inducing(20, Z)
    assert len(seen[-1]) == 160  # at least 8 rows per inducing point
    inducing(10, Z[:90])
    np.testing.assert_array_equal(seen[-1], Z[:90].numpy())  # fewer rows than the sample: all, in order


@pytest.mark.slow
def test_gp_scale_benchmark_runs_end_to_end(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gp_scale

    result = gp_scale.main(["--rows", "1200", "--dim", "16", "--classes", "3", "--inducing", "16", "--epochs",
                            "2", "--data", str(tmp_path / "X.npy"), "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == result
    peak, seconds = result["peak_rss_mb"], result["seconds"]
    assert peak["fit_end"] >= peak["first_epoch"] >= peak["kmeans_start"] >= peak["before_fit"] > 0
    assert seconds["fit"] >= seconds["kmeans"] > 0 and result["epochs"] == 2
    assert result["train_accuracy_sample"] > 0.6 and not (tmp_path / "X.npy").exists()


def test_each_ranks_share_of_the_held_out_split_is_its_part_of_the_one_process_split(monkeypatch):
    """Two simulated ranks (their all_gather answered by hand) hold out exactly the rows one process does."""
    from xferkit.heads import lr
    from xferkit.heads.base import stratified_holdout

    y = np.random.default_rng(0).integers(0, 3, 101)
    kept, held_out = stratified_holdout(y, 0.2, 5)
    parts = [y[:50], y[50:]]
    monkeypatch.setattr(lr, "all_gather_objects", lambda obj: parts)
    got = []
    for rank, start in ((0, 0), (1, 50)):
        monkeypatch.setattr(lr, "rank", lambda rank=rank: rank)
        own_kept, own_held, n_held = lr._own_split(parts[rank], 0.2, 5, sharded=True)
        assert n_held == len(held_out) and 0 < len(own_held) < len(held_out)
        got.append((own_kept + start, own_held + start))
    assert np.concatenate([k for k, _ in got]).tolist() == kept.tolist()
    assert np.concatenate([h for _, h in got]).tolist() == held_out.tolist()
    assert lr._own_split(y, 0.2, 5, sharded=False)[0].tolist() == kept.tolist()


def test_streamed_fit_chooses_C_like_the_in_memory_fit(tmp_path):
    """C=None on a memory map, a chunk at a time: the held-out split, C and the objective of ``fit``."""
    from xferkit.heads import LogisticHead

    X, y = _features(n=300)
    np.save(tmp_path / "X.npy", X)
    mapped = np.load(tmp_path / "X.npy", mmap_mode="r")
    steps = []
    in_memory = LogisticHead(solver="torch", random_state=3).fit(X, y)
    streamed = LogisticHead(random_state=3).fit_streamed(mapped, y, chunk_rows=70, sharded=True,
                                                         progress=lambda *step: steps.append(step))
    assert streamed.C_ == in_memory.C_ and streamed.solver_ == "torch"
    assert [step[:2] for step in steps] == [(1, 2), (2, 2)] and f"C={streamed.C_:g}" in steps[0][2]
    reached, reference = _objective(streamed, X, y), _objective(in_memory, X, y)
    assert abs(reached - reference) <= 1e-6 * reference
    with pytest.raises(XferkitError, match="give validation_fraction > 0"):
        LogisticHead(validation_fraction=0).fit_streamed(mapped, y)


def test_the_lr_path_for_torchrun_fits_like_one_process(monkeypatch, tmp_path):
    """The torchrun lr path run on one process (collectives are no-ops there) gives the usual model."""
    from xferkit.heads import LogisticHead
    from xferkit.io.data import load_splits
    from xferkit.model import models
    from xferkit.model.options import BackboneOptions, ExtractOptions

    data = write_image_folder(tmp_path / "data", per_class=8)
    splits = load_splits(data, 0.2, 0)
    common = {"backbone": BackboneOptions(TINY_BACKBONE, pretrained=False), "train": splits.train,
              "val": splits.val, "options": ExtractOptions(workers=0)}
    usual, _ = models.fit_model("lr", **common)
    gathers, extract = [], models.extract_features
    monkeypatch.setattr(models, "streams", lambda head, folds: True)
    monkeypatch.setattr(models, "extract_features",
                        lambda *a, **k: gathers.append(k["gather"]) or extract(*a, **k))
    sharded, fitted = models.fit_model("lr", **common)
    assert gathers == [False, False]  # the training and the validation images: never gathered
    head = sharded.estimator
    assert head.solver_ == "torch" and head.C_ == usual.estimator.C_
    assert sharded.classes == usual.classes and fitted.skipped == []
    X = models._extract(usual.backbone, splits.train.paths, common["options"], models.SILENT).features
    reference = LogisticHead(random_state=0).fit_streamed(X, models._names(splits.train))
    np.testing.assert_allclose(head.coef_, reference.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sharded.class_means.means, usual.class_means.means, rtol=1e-5, atol=1e-6)
    # a constant channel's deviation is 0 or rounding noise, floored by 1e-3 of the median: absolute slack
    np.testing.assert_allclose(sharded.class_means.std, usual.class_means.std, rtol=1e-5,
                               atol=1e-4 * usual.class_means.std.max())
    assert sharded.metrics["n"] == usual.metrics["n"] == 6
    assert sharded.metrics["accuracy"] == usual.metrics["accuracy"]
    np.testing.assert_allclose(sharded.held_out.ood_scores, usual.held_out.ood_scores, rtol=1e-4)


#: The CLI, recording per rank the widths of the float tables it gathers, the rows lr fits on, and saves.
RECORDING_RANK = """
import json, sys
from pathlib import Path
import numpy as np
import torch.distributed as dist
from xferkit.core import distributed
from xferkit.heads import LogisticHead
from xferkit.model.models import TransferModel

record = {"gathered_widths": [], "fitted_rows": [], "saves": 0}
gather, fit, save = dist.all_gather_object, LogisticHead.fit_streamed, TransferModel.save

def widths(obj):
    if isinstance(obj, np.ndarray):
        return [obj.shape[1]] if obj.ndim == 2 and obj.dtype.kind == "f" else []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [w for item in items for w in widths(item)]

def recorded_gather(out, obj, *args, **kwargs):
    record["gathered_widths"] += widths(obj)
    return gather(out, obj, *args, **kwargs)

def recorded_fit(head, X, y, **kwargs):
    record["fitted_rows"].append(len(X))
    return fit(head, X, y, **kwargs)

def recorded_save(model, *args, **kwargs):
    record["saves"] += 1
    return save(model, *args, **kwargs)

dist.all_gather_object, LogisticHead.fit_streamed = recorded_gather, recorded_fit
TransferModel.save = recorded_save
from xferkit.cli import app
try:
    app(sys.argv[2:], prog_name="xferkit")
finally:
    Path(f"{sys.argv[1]}.{distributed.rank()}.json").write_text(json.dumps(record))
"""


@pytest.mark.slow
@pytest.mark.parametrize("C", [None, 0.01])
def test_torchrun_lr_repurpose_fits_each_ranks_rows_like_one_process(tmp_path, C):
    """2 ranks: one process's classes, C and validation metrics, the streamed fit of all the rows (its
    objective; its weights where C makes them well determined); no feature table gathered; rank 0 saves."""
    from xferkit.heads import FeatureHead, LogisticHead
    from xferkit.io.data import load_splits

    data = write_image_folder(tmp_path / "data", per_class=12)
    args = ["repurpose", data, "--backbone", TINY_BACKBONE, "--no-pretrained", "--workers", "0", "--json",
            *(["--C", C] if C else [])]
    single = json.loads(run_cli(*args, "-o", tmp_path / "one").stdout)
    (tmp_path / "rank.py").write_text(RECORDING_RANK)
    done = _torchrun(tmp_path / "rank.py", tmp_path / "record", *args, "-o", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    both = json.loads(done.stdout)  # only rank 0 printed: one JSON document
    one, two = FeatureHead.load(tmp_path / "one"), FeatureHead.load(tmp_path / "two")
    assert both["classes"] == single["classes"] and two.C_ == one.C_ and two.solver_ == "torch"
    for key, value in single["validation_metrics"].items():
        assert both["validation_metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    train = load_splits(data, 0.2, 0).train
    features = extract_features(create_backbone(TINY_BACKBONE, pretrained=False), train.paths, workers=0)
    labels = np.array(train.classes)[train.labels][features.kept]
    reference = LogisticHead(C, random_state=0).fit_streamed(features.features, labels)
    np.testing.assert_allclose(two.mean_, reference.mean_, rtol=1e-5, atol=1e-6)
    y = np.searchsorted(reference.classes_, labels)
    reached, best = _objective(two, features.features, y), _objective(reference, features.features, y)
    assert abs(reached - best) <= 1e-6 * max(best, 1.0)  # the solver's own stopping rule (FTOL)
    if C:  # C=100 (chosen here) leaves the weights ill-determined: a 1e-5 change of X moves them by 20%
        for name in ("coef_", "intercept_"):
            got, expected = getattr(two, name), getattr(reference, name)
            assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected), name
    records = [json.loads((tmp_path / f"record.{rank}.json").read_text()) for rank in range(2)]
    width = create_backbone(TINY_BACKBONE, pretrained=False).num_features
    assert all(width not in r["gathered_widths"] and 3 in r["gathered_widths"] for r in records), records
    assert [r["fitted_rows"] for r in records] == [[15], [15]]  # each rank fits its half of the 30 images
    assert [r["saves"] for r in records] == [1, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "one", "rank.py", "record.0.json",
                                                          "record.1.json", "two"]


@pytest.mark.slow
def test_lr_sharded_benchmark_runs_on_two_ranks(tmp_path):
    from xferkit.heads.lr import C_GRID

    done = _torchrun(ROOT / "benchmarks" / "lr_sharded.py", "--rows", "3000", "--dim", "16", "--classes", "3",
                     "--chunk-rows", "700", "--choose-C", "--data", tmp_path / "X.npy", "--json",
                     tmp_path / "out.json")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["world_size"] == 2 and result["same_weights_on_every_rank"]
    assert [r["rows"] for r in result["ranks"]] == [1500, 1500] and done.stdout.count("| rank ") == 2
    assert all(r["peak_rss_mb"] >= r["peak_rss_mb_before_fit"] > 0 for r in result["ranks"])
    assert result["C"] in C_GRID and result["iterations"] > 0 and not (tmp_path / "X.npy").exists()
