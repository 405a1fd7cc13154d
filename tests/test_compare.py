"""`xferkit compare`: one row per head on one split, artifacts that predict, failures isolated, plots."""

import json

import numpy as np
import pytest
from conftest import TINY_BACKBONE, run_cli, write_image_folder

from xferkit.api import ExtractOptions, evaluate, predict
from xferkit.api.comparison import COLUMNS, Comparison, HeadResult, per_class_subset
from xferkit.io.data import read_image_folder
from xferkit.model.registry import head_class, head_names

TINY = ["--backbone", TINY_BACKBONE, "--no-pretrained", "--image-size", "32", "--workers", "0"]
#: Small budgets for every head that trains for epochs (pixel heads, gp, bnn).
BUDGET = ["--epochs", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_every_head_with_one_failing(tmp_path, monkeypatch):
    data = write_image_folder(tmp_path / "data", per_class=12)
    heads = head_names()
    victim = next(h for h in heads if h != "lr")  # any other registered head

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(head_class(victim), "fit", out_of_memory)
    out = tmp_path / "cmp"
    report = json.loads(run_cli("compare", data, "-o", out, *TINY, *BUDGET, "--heads", ",".join(heads),
                            "--learning-curve", "--json").stdout)

    rows = {row["head"]: row for row in report["heads"]}
    assert list(rows) == heads
    assert rows[victim]["status"] == "failed" and "out of memory" in rows[victim]["error"]
    assert not (out / victim).exists()
    ok = [row for row in report["heads"] if row["status"] == "ok"]
    assert {row["head"] for row in ok} == set(heads) - {victim}, report["heads"]
    assert report["split"]["test"] == 6 and "held out" in " ".join(report["notes"])
    classes = read_image_folder(data).classes
    for row in ok:  # each row reports what its saved model scores on the held-out test set
        scored = evaluate(row["artifact"], out / "test.csv", options=ExtractOptions(workers=0)).metrics
        for key in ("accuracy", "macro_f1", "nll", "ece", "brier"):
            assert row[key] == pytest.approx(scored[key], abs=1e-6), (row["head"], key)
        assert row["fit_seconds"] > 0 and row["predict_ms_per_image"] > 0 and row["size_mb"] > 0
        assert row["n_test"] == 6
        predictions = predict(row["artifact"], [data / "red" / "0.png"], options=ExtractOptions(workers=0))
        assert predictions.predictions[0].label in classes
    assert rows["lr"]["accuracy"] > 0.9  # colours are trivially separable: a working head gets them
    best = report["best"]
    assert set(best) == {c for c, higher in COLUMNS.items() if higher is not None}
    assert best["accuracy"] in {row["head"] for row in ok}
    assert rows[best["accuracy"]]["accuracy"] == max(row["accuracy"] for row in ok)

    curve = report["learning_curve"]["lr"]
    assert [k for k, _ in curve][:3] == [1, 2, 5] and curve[-1] == [8.0, rows["lr"]["accuracy"]]
    for plot in ("reliability.png", "accuracy_vs_fit_time.png", "learning_curve.png"):
        assert (out / plot).read_bytes().startswith(PNG_MAGIC), plot
        assert str(out / plot) in report["plots"]
    assert json.loads((out / "report.json").read_text()) == report

    again = run_cli("compare", data, "-o", out, *TINY, "--heads", "lr", code=2)
    assert "already exists" in again.stderr and "--force" in again.stderr


def test_compare_uses_the_datas_own_test_split(split_folder, tmp_path):
    report = json.loads(run_cli("compare", split_folder, "-o", tmp_path / "cmp", *TINY, "--heads", "lr",
                            "--json").stdout)
    assert report["test_source"] == str(split_folder / "test") and report["split"]["test"] == 15
    assert not (tmp_path / "cmp" / "test.csv").exists()
    assert report["heads"][0]["n_test"] == 15


def test_compare_table_marks_the_best_head():
    rows = [HeadResult("a", "ok", {c: 0.5 for c in COLUMNS}),
            HeadResult("b", "ok", {c: 0.7 for c in COLUMNS}), HeadResult("c", "failed", error="x")]
    best = Comparison(rows, {}, "", []).best()
    assert best["accuracy"] == "b" and best["nll"] == "a" and best["fit_seconds"] == "a"
    assert "coverage" not in best  # near its target is good, not highest


def test_compare_reports_conformal_coverage_where_the_model_can_give_sets(split_folder, tmp_path):
    report = json.loads(run_cli("compare", split_folder, "-o", tmp_path / "cmp", *TINY, "--heads", "lr",
                                "--val-split", "0.4", "--json").stdout)  # 12 held out: enough for 90 % sets
    row = report["heads"][0]
    scored = evaluate(row["artifact"], split_folder / "test", coverage=0.9,
                      options=ExtractOptions(workers=0)).metrics
    assert row["coverage"] == pytest.approx(scored["coverage"]) and row["mean_set_size"] >= 1


def test_per_class_subsets_nest_and_keep_every_class(image_folder):
    data = read_image_folder(image_folder)
    small, large = per_class_subset(data, 2, seed=3), per_class_subset(data, 5, seed=3)
    assert np.bincount(small.labels).tolist() == [2, 2, 2]
    assert set(small.paths) <= set(large.paths)


def test_compare_settings_name_their_head():
    for bad, message in [("C=1", "HEAD.PARAM=VALUE"), ("lr.nope=1", "no parameter"),
                         ("lr.max_iter=many", "not a valid")]:
        result = run_cli("compare", ".", "--set", bad, code=2)
        assert message in result.stderr


def test_compare_sends_the_test_set_through_the_backbone_once(split_folder, tmp_path, monkeypatch):
    import xferkit.features.extract as extraction

    through, run_backbone = [], extraction._run_backbone

    def counting(backbone, paths, *args):
        through.extend(paths)
        return run_backbone(backbone, paths, *args)

    monkeypatch.setattr(extraction, "_run_backbone", counting)
    report = json.loads(run_cli("compare", split_folder, "-o", tmp_path / "cmp", *TINY, *BUDGET, "--no-cache",
                                "--heads", "lr,bnn", "--json").stdout)
    test = [p for p in through if p.parent.parent.name == "test"]
    # one pass that the heads' evaluations share, and the same 15 images timed once for the backbone's cost
    assert len(test) == 2 * 15 and len(set(test)) == 15
    assert len([p for p in through if p.parent.parent.name == "train"]) == 30  # the heads share these too
    assert report["backbone_ms_per_image"] > 0 and "ms per test image" in " ".join(report["notes"])
    assert all(row["status"] == "ok" and row["predict_ms_per_image"] > 0 for row in report["heads"])
