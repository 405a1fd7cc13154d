"""Held-out records end to end: cross-fitted refits, prediction sets and OOD flags in the CLI, old folders."""

import json

import numpy as np
import pytest
from conftest import TINY_BACKBONE, run_cli, write_image_folder
from safetensors.numpy import save_file
from scipy.special import softmax

from xferkit.api.tuning import merge
from xferkit.core.calibration import calibrate
from xferkit.core.errors import XferkitError
from xferkit.io.data import load_splits
from xferkit.model import BackboneOptions, ExtractOptions, fit_model, load_model

TINY = BackboneOptions(TINY_BACKBONE, pretrained=False, image_size=32)
QUIET = ExtractOptions(batch_size=16, workers=0)
TINY_FLAGS = ["--backbone", TINY_BACKBONE, "--no-pretrained", "--image-size", "32", "--workers", "0"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """30 images a colour to fit on (27 held out at --val-split 0.3: enough for 0.9 and 5 %), 5 to test."""
    root = tmp_path_factory.mktemp("colours")
    write_image_folder(root / "data" / "train", per_class=30, seed=1)
    write_image_folder(root / "data" / "test", per_class=5, seed=2)
    return root / "data"


@pytest.fixture(scope="module")
def model_folder(colours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "lr"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XFERKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        run_cli("repurpose", colours, "-o", folder, "--val-split", "0.3", *TINY_FLAGS)
    return folder


def copied(folder, to):
    to.mkdir()
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def test_the_temperature_softens_an_over_confident_head():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (400, 5))
    y = (softmax(logits, axis=1).cumsum(1) > rng.random((400, 1))).argmax(1)
    result = calibrate(softmax(3 * logits, axis=1), y)  # three times too sharp
    assert result.temperature > 2 and result.nll_after < result.nll_before - 0.1


def test_model_json_records_the_held_out_scores_and_predict_uses_them(model_folder, colours):
    held_out = json.loads((model_folder / "model.json").read_text())["held_out"]
    assert held_out["source"] == "validation split" and held_out["n"] == 27
    assert held_out["ood_score"] == "distance"
    assert held_out["conformal_scores"] == sorted(held_out["conformal_scores"])
    out = json.loads(run_cli("predict", model_folder, colours / "test", "--coverage", "0.9", "--json",
                             "--workers", "0").stdout)["predictions"]
    assert len(out) == 15
    for p in out:
        assert p["label"] == p["prediction_set"][0] and isinstance(p["ood"], bool)
        assert "distance" in p["uncertainty"]
    csv = model_folder.parent / "p.csv"
    run_cli("predict", model_folder, colours / "test", "--coverage", "0.9", "--csv", csv, "--workers", "0")
    assert csv.read_text().splitlines()[0].startswith("path,label,probability,top_k,prediction_set,ood,")


def test_evaluate_reports_coverage_set_size_and_ood_detection(model_folder, colours, tmp_path):
    far = write_image_folder(tmp_path / "far", per_class=4, seed=9)  # the keys here; test_ood: detection
    metrics = json.loads(run_cli("evaluate", model_folder, colours / "test", "--coverage", "0.9", "--ood",
                                 far, "--json", "--workers", "0").stdout)["metrics"]
    assert 0.0 <= metrics["coverage"] <= 1.0 and 1.0 <= metrics["mean_set_size"] <= 3.0
    assert {"ood_auroc", "ood_detection_rate", "ood_false_alarm_rate"} <= set(metrics)
    too_high = run_cli("evaluate", model_folder, colours / "test", "--coverage", "0.99", code=2).output
    assert "needs at least 99 held-out images; this model was calibrated on 27" in too_high


def test_an_old_folder_loads_and_predicts_but_coverage_asks_to_repurpose(model_folder, colours, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("head.json", "head.safetensors"):
        (old / name).write_bytes((model_folder / name).read_bytes())
    manifest = json.loads((model_folder / "model.json").read_text())
    del manifest["held_out"]
    (old / "model.json").write_text(json.dumps(manifest))
    out = json.loads(run_cli("predict", old, colours / "test", "--json", "--workers", "0").stdout)
    assert "ood" not in out["predictions"][0] and "prediction_set" not in out["predictions"][0]
    error = run_cli("predict", old, colours / "test", "--coverage", "0.9", code=2).output
    assert "`xferkit repurpose` run with --val-split" in error and error.count("error:") == 1


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(n=3), "held_out.n is 3"),
    (lambda h: h["ood_scores"].reverse(), "held_out.ood_scores must be an ascending list"),
    (lambda h: h["conformal_scores"].__setitem__(0, 1.5), "conformal_scores must be an ascending list of "),
    (lambda h: h.update(ood_score="energy"), "held_out.ood_score must be one of"),
])
def test_a_damaged_held_out_record_is_refused(model_folder, tmp_path, edit, message):
    copy = copied(model_folder, tmp_path / "copy")
    manifest = json.loads((copy / "model.json").read_text())
    edit(manifest["held_out"])
    (copy / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(XferkitError, match=message):
        load_model(copy)


def test_damaged_class_means_are_refused(model_folder, tmp_path):
    copy = copied(model_folder, tmp_path / "copy")
    means = {"means": np.zeros((2, 4), np.float32), "std": np.ones(4, np.float32)}
    save_file(means, copy / "ood.safetensors")
    with pytest.raises(XferkitError, match=r"ood.safetensors: arrays means \(2, 4\) and std \(4,\) must be"):
        load_model(copy)
    (copy / "ood.safetensors").unlink()
    with pytest.raises(XferkitError, match="records OOD scores by distance but the folder lacks ood.safe"):
        load_model(copy)


def test_a_refit_on_train_and_val_is_calibrated_by_cross_fitting(colours, tmp_path):
    splits = load_splits(colours, 0.3, 0)
    both = merge(splits.train, splits.val)
    model, _ = fit_model("lr", {"C": 1.0}, backbone=TINY, train=both, options=QUIET, folds=5)
    assert model.held_out.source == "5-fold cross-fitting on the training images"
    assert model.calibration.n == len(both) == model.metrics["n"] == len(model.held_out.conformal_scores)
    loaded = load_model(model.save(tmp_path / "refit"))
    np.testing.assert_array_equal(loaded.held_out.ood_scores, model.held_out.ood_scores)
    np.testing.assert_array_equal(loaded.class_means.means, model.class_means.means)
    with pytest.raises(XferkitError, match="for feature heads, not scratch"):
        fit_model("scratch", backbone=TINY, train=both, options=QUIET, folds=5)
