"""The model layer: fit, calibrate, save and load both kinds of model; refuse folders that do not add up."""

import json

import numpy as np
import pytest
from conftest import TINY_BACKBONE, write_image_folder

from xferkit.core.errors import XferkitError
from xferkit.io.data import load_splits, read_image_folder
from xferkit.model import BackboneOptions, ExtractOptions, fit_model, load_model

TINY = BackboneOptions(TINY_BACKBONE, pretrained=False, image_size=32)
QUIET = ExtractOptions(batch_size=8, workers=0)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    test = write_image_folder(root / "test", per_class=4, seed=5)
    return load_splits(write_image_folder(root / "data", per_class=12)), test


@pytest.fixture(scope="module")
def saved(colours, tmp_path_factory):
    """An lr model fitted on the colours and saved."""
    splits, _ = colours
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XFERKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        model, _ = fit_model("lr", backbone=TINY, train=splits.train, val=splits.val, options=QUIET)
        folder = model.save(tmp_path_factory.mktemp("models") / "lr")
    return model, folder


def test_feature_model_predicts_the_same_after_loading(saved, colours):
    model, folder = saved
    test = read_image_folder(colours[1])
    before = model.predict(test.paths, QUIET)
    after = load_model(folder).predict(test.paths, QUIET)
    np.testing.assert_array_equal(before.proba, after.proba)
    assert (before.proba.argmax(1) == test.labels).mean() == 1.0
    assert set(before.uncertainty) == {"entropy", "distance"}  # distance to the class means: the OOD score
    np.testing.assert_array_equal(before.uncertainty["distance"], after.uncertainty["distance"])


def test_calibration_is_recorded_and_applied(saved):
    model, folder = saved
    manifest = json.loads((folder / "model.json").read_text())
    assert manifest["calibration"]["temperature"] == model.calibration.temperature
    assert manifest["calibration"]["nll_after"] <= manifest["calibration"]["nll_before"]
    assert manifest["validation_metrics"]["nll"] == pytest.approx(manifest["calibration"]["nll_after"])


def test_uncalibrated_models_say_so(colours):
    splits, _ = colours
    model, _ = fit_model("lr", backbone=TINY, train=splits.train, val=splits.val, options=QUIET,
                         calibrated=False)
    assert model.calibration is None and model.metrics["n"] == len(splits.val)


def _copy(folder, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def test_permuted_classes_in_the_manifest_are_refused(saved, tmp_path):
    copy = _copy(saved[1], tmp_path)
    manifest = json.loads((copy / "model.json").read_text())
    manifest["classes"] = manifest["classes"][::-1]
    (copy / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(XferkitError, match="does not match the saved head"):
        load_model(copy)


def test_other_base_weights_are_refused(saved, tmp_path):
    copy = _copy(saved[1], tmp_path)
    manifest = json.loads((copy / "model.json").read_text())
    manifest["backbone"]["weights_digest"] = "0" * 64
    (copy / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(XferkitError, match="not the ones this model was trained on"):
        load_model(copy)


def test_a_format_1_model_is_refused_with_the_command_that_recreates_it(saved, tmp_path):
    copy = _copy(saved[1], tmp_path)
    (copy / "model.json").write_text(json.dumps({"format_version": 1, "backbone": {"name": "resnet18"},
                                                 "head": {"name": "gp", "params": {}}}))
    with pytest.raises(XferkitError, match="format 1.*repurpose --backbone resnet18 --head gp"):
        load_model(copy)


def test_network_model_round_trips(colours, tmp_path):
    splits, test_folder = colours
    model, fitted = fit_model("finetune", {"epochs": 1, "unfreeze": "1"}, backbone=TINY, train=splits.train,
                              val=splits.val, options=QUIET)
    assert model.kind == "pixels" and model.calibration is not None and not fitted.skipped
    model.save(tmp_path / "ft")
    manifest = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert manifest["kind"] == "pixels" and manifest["head"]["params"]["backbone"] == TINY_BACKBONE
    test = read_image_folder(test_folder)
    np.testing.assert_array_equal(model.predict(test.paths, QUIET).proba,
                                  load_model(tmp_path / "ft").predict(test.paths, QUIET).proba)


def test_unreadable_training_images_are_skipped_and_counted(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=8)
    (data / "red" / "broken.png").write_bytes(b"not a png")
    splits = load_splits(data, val_split=0.25)
    model, fitted = fit_model("lr", backbone=TINY, train=splits.train, val=splits.val, options=QUIET)
    assert [p.name for p, _ in fitted.skipped] == ["broken.png"]
    assert model.info["n_train"] + model.info["n_val"] == 24
