"""Smoke runs of the benchmark scripts on tiny inputs: they run end to end and write their JSON."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a script from benchmarks/ by name (importable, so its process pool can pickle it)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def test_extract_benchmark_measures_the_three_paths(bench, tmp_path, capsys):
    extract = bench("extract")
    result = extract.main(["--backbone", TINY_BACKBONE, "--images", "8", "--sizes", "small",
                           "--device", "cpu", "--batch-size", "4", "--data", str(tmp_path / "jpegs"),
                           "--json", str(tmp_path / "extract.json")])
    assert len(list((tmp_path / "jpegs").glob("*/*.jpg"))) == 8
    ips = result["images_per_s"]
    assert set(ips) == {"ceiling", "ceiling_default_threads", "ceiling_budget_threads", "naive", "xferkit"}
    assert all(v > 0 for v in ips.values()) and result["budget_threads"] >= 1
    assert ips["ceiling"] == max(ips["ceiling_default_threads"], ips["ceiling_budget_threads"])
    assert result["xferkit_over_ceiling"] == pytest.approx(
        result["images_per_s"]["xferkit"] / result["images_per_s"]["ceiling"], rel=0.01)
    assert result["peak_mb_xferkit"] > 0 and result["peak_mb_xferkit_quarter"] > 0
    assert json.loads((tmp_path / "extract.json").read_text()) == result
    assert "3/max(1, 1b) =" in capsys.readouterr().out


def test_generated_photos_have_the_requested_sizes(bench, tmp_path):
    extract = bench("extract")
    paths = extract.make_images(tmp_path, 3, ((64, 48), (48, 64)))
    from PIL import Image

    assert [Image.open(p).size for p in paths] == [(64, 48), (48, 64), (64, 48)]
    assert len({p.parent.name for p in paths}) == 3  # spread over the classes


def test_heads_benchmark_compares_with_scikit_learn(bench, tmp_path, capsys):
    heads = bench("heads")
    result = heads.main(["--device", "cpu", "--sizes", "300x32x3", "--grid", "300x32x3", "--thread-heads",
                         "--json", str(tmp_path / "heads.json")])
    rows = result["lr"]
    fits = [r["fit"] for r in rows]
    assert sum("scikit-learn" in f for f in fits) == 3 and sum("xferkit" in f for f in fits) == 2
    assert all(r["test_accuracy"] > 0.5 for r in rows)  # separable enough that every fit learns
    assert [r["objective_gap"] is None for r in rows] == ["refitted" in f for f in fits]
    assert all(r["objective_gap"] >= 0 for r in rows if r["objective_gap"] is not None)
    assert min(r["objective_gap"] for r in rows if r["C"] == 1.0) == 0
    assert json.loads((tmp_path / "heads.json").read_text()) == result and result["threads"] == []
    assert "| 300x32, 3 classes |" in capsys.readouterr().out


def test_heads_benchmark_times_each_head_under_each_thread_setting(bench, tmp_path, capsys, monkeypatch):
    heads = bench("heads")
    # the libraries' defaults can spin for a minute on a loaded machine: what is tested here is the table
    monkeypatch.setitem(heads.THREAD_SETTINGS, "default", heads.THREAD_SETTINGS["one"])
    result = heads.main(["--sizes", "--thread-size", "60x8x3", "--thread-heads", "lr",
                         "--json", str(tmp_path / "heads.json")])
    (row,) = result["threads"]
    assert row["head"] == "lr" and set(row["seconds"]) == {"default", "budget", "one"}
    assert all(s > 0 for s in row["seconds"].values()) and result["lr"] == []
    assert row["one_over_budget"] == pytest.approx(row["seconds"]["one"] / row["seconds"]["budget"], abs=0.01)
    assert "| 60x8, 3 classes | lr |" in capsys.readouterr().out


def _oriented_jpeg(path, size, orientation):
    """A smooth photo-like JPEG whose EXIF says to display it turned by *orientation*."""
    from PIL import Image

    rng = np.random.default_rng(orientation)
    small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=92, exif=exif)
    return path


#: Decoded at the same DCT scale as PIL (1/2), the pixels agree closely; at 500x375 PIL decodes the
#: whole image and the turbo bindings at 3/4, which differs more (a turned image differs by ~50).
@pytest.mark.parametrize(("size", "bound"), [((800, 600), 1.0), ((500, 375), 6.0)])
def test_every_decoder_agrees_with_pil_and_respects_exif_orientation(bench, tmp_path, size, bound):
    decoders = bench("decoders")
    from xferkit.preprocess import Preprocess

    preprocess = Preprocess((224, 224), "bilinear", (0.5,) * 3, (0.5,) * 3, 0.875)
    for orientation in (1, 3, 6, 8):  # upright, upside down, and both quarter turns
        path = _oriented_jpeg(tmp_path / f"{orientation}.jpg", size, orientation)
        reference = decoders.pil_draft(path, preprocess).astype(np.int16)
        for name, decode in decoders.available().items():
            if isinstance(decode, str):
                continue
            out = decode(path, preprocess)
            assert out.shape == reference.shape == (224, 224, 3), name
            assert np.abs(out - reference).mean() < bound, (name, orientation)


def test_a_decoder_that_cannot_load_is_reported_not_fatal(bench, tmp_path, monkeypatch):
    import sys

    decoders = bench("decoders")
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "turbojpeg", None)
    found = decoders.available()
    assert found["simplejpeg M/8, pil resize"].startswith("unavailable: ModuleNotFoundError")
    assert found["pyturbojpeg M/8, pil resize"].startswith("unavailable: ModuleNotFoundError")
    from xferkit.preprocess import Preprocess

    path = _oriented_jpeg(tmp_path / "a.jpg", (160, 120), 6)
    preprocess = Preprocess((64, 64), "bilinear", (0.5,) * 3, (0.5,) * 3, 0.875)
    results = decoders.measure([path], preprocess, rounds=1)
    assert results["simplejpeg M/8, pil resize"]["status"].startswith("unavailable")
    assert results["pil draft"]["max_mean_abs_diff"] == 0
    assert results["xferkit (simplejpeg, torch resize)"]["max_mean_abs_diff"] < 1
    assert results["pil full"]["cpu_ms_per_image"] > 0


def test_finetune_benchmark_times_epochs_and_the_ceiling(bench, tmp_path, capsys):
    speed = bench("finetune_speed")
    result = speed.main(["--backbone", TINY_BACKBONE, "--images", "16", "--epochs", "2", "--batch-size", "8",
                         "--workers", "0", "--ceiling-steps", "2", "--device", "cpu", "--image-size", "32",
                         "--data", str(tmp_path / "jpegs"), "--json", str(tmp_path / "ft.json")])
    assert len(result["epoch_images_per_s"]) == 2 and all(r > 0 for r in result["epoch_images_per_s"])
    assert result["training_images_per_s"] == result["epoch_images_per_s"][1]
    assert result["training_over_ceiling"] == pytest.approx(
        result["training_images_per_s"] / result["ceiling_images_per_s"], rel=0.01)
    assert json.loads((tmp_path / "ft.json").read_text()) == result
    assert "xferkit / ceiling" in capsys.readouterr().out


def test_decode_limits_time_each_decoder_without_the_backbone(bench, tmp_path):
    extract = bench("extract")
    from xferkit.backbones import create_backbone

    paths = extract.make_images(tmp_path, 4, ((64, 48), (48, 64)))
    limits = extract.decode_limits(create_backbone(TINY_BACKBONE, pretrained=False), paths,
                                   torch.device("cpu"), 2, 0)
    assert {"workers", "device"} <= set(limits) and all(rate > 0 for rate in limits.values())


def test_gpu_decoders_benchmark_runs_the_cpu_decoders(bench, tmp_path, capsys):
    extract = bench("extract")
    extract.make_images(tmp_path / "jpegs", 4, ((64, 48), (48, 64)))
    result = bench("gpu_decoders").main([str(tmp_path / "jpegs"), "--images", "4", "--batch-size", "2",
                                         "--device", "cpu", "--json", str(tmp_path / "d.json")])
    rates = result[str(tmp_path / "jpegs")]
    assert rates["files"] == 4 and rates["torchvision"] > 0
    assert "nvimgcodec CPU_ONLY" in rates  # images/s, or why nvImageCodec could not run here
    assert "| torchvision |" in capsys.readouterr().out
