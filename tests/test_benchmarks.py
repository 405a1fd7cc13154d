"""Smoke runs of the benchmark scripts on tiny inputs: they run end to end and write their JSON."""

import importlib
import json
from pathlib import Path

import pytest
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
    assert set(result["images_per_s"]) == {"ceiling", "naive", "xferkit"}
    assert all(v > 0 for v in result["images_per_s"].values())
    assert result["xferkit_over_ceiling"] == pytest.approx(
        result["images_per_s"]["xferkit"] / result["images_per_s"]["ceiling"], rel=0.01)
    assert result["peak_mb_xferkit"] > 0 and result["peak_mb_xferkit_quarter"] > 0
    assert json.loads((tmp_path / "extract.json").read_text()) == result
    assert "3/1 =" in capsys.readouterr().out


def test_generated_photos_have_the_requested_sizes(bench, tmp_path):
    extract = bench("extract")
    paths = extract.make_images(tmp_path, 3, ((64, 48), (48, 64)))
    from PIL import Image

    assert [Image.open(p).size for p in paths] == [(64, 48), (48, 64), (64, 48)]
    assert len({p.parent.name for p in paths}) == 3  # spread over the classes


def test_heads_benchmark_compares_with_scikit_learn(bench, tmp_path, capsys):
    heads = bench("heads")
    rows = heads.main(["--device", "cpu", "--sizes", "300x32x3", "--grid", "300x32x3",
                       "--json", str(tmp_path / "heads.json")])
    fits = [r["fit"] for r in rows]
    assert sum("scikit-learn" in f for f in fits) == 3 and sum("xferkit" in f for f in fits) == 2
    assert all(r["test_accuracy"] > 0.5 for r in rows)  # separable enough that every fit learns
    assert [r["objective_gap"] is None for r in rows] == ["refitted" in f for f in fits]
    assert all(r["objective_gap"] >= 0 for r in rows if r["objective_gap"] is not None)
    assert min(r["objective_gap"] for r in rows if r["C"] == 1.0) == 0
    assert json.loads((tmp_path / "heads.json").read_text()) == rows
    assert "| 300x32, 3 classes |" in capsys.readouterr().out
