"""The scratch baseline: trains the backbone's architecture from He initialisation, no pretrained weights."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, write_image_folder
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from xferkit import training
from xferkit.backbones import create_backbone
from xferkit.errors import XferkitError
from xferkit.heads.scratch import ScratchHead
from xferkit.model import TransferModel
from xferkit.pipeline import BackboneOptions, ExtractOptions, evaluate, repurpose
from xferkit.training import training_batch_size

QUIET = ExtractOptions(batch_size=8, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Scratch on the colour folder, asked for with *pretrained* weights that are not available offline."""
    root = tmp_path_factory.mktemp("scratch")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_HOME", str(root / "hf"))
        env.setenv("XFERKIT_CACHE", str(root / "cache"))
        data = write_image_folder(root / "data", per_class=10)
        with pytest.raises(XferkitError, match="no pretrained weights"):  # what a transfer head meets
            repurpose(data, BackboneOptions(TINY_BACKBONE, image_size=32), "lr", options=QUIET)
        result = repurpose(data, BackboneOptions(TINY_BACKBONE, image_size=32), "scratch", root / "model",
                           {"epochs": 4}, options=QUIET)
    return result.model, root / "model", write_image_folder(root / "test", per_class=5, seed=3)


def test_needs_no_pretrained_weights_and_says_so(trained):
    _, folder, _ = trained
    backbone = json.loads((folder / "model.json").read_text())["backbone"]
    assert backbone["pretrained"] is False and backbone["weights_file"] is None
    assert backbone["weights_source"].startswith("none: the scratch head")


def test_learns_the_colour_folder_with_valid_probabilities(trained):
    _, folder, test = trained
    report = evaluate(folder, test, QUIET)
    assert report.metrics["accuracy"] >= 0.8  # chance is 1/3
    assert np.allclose(report.proba.sum(axis=1), 1.0, atol=1e-5)
    assert report.proba.min() >= 0.0 and report.proba.max() <= 1.0


def test_save_load_gives_identical_predictions_and_saves_the_whole_network(trained):
    model, folder, test = trained
    paths = sorted(test.rglob("*.png"))
    before, _ = model.predict_proba(paths, **vars(QUIET))
    after, _ = TransferModel.load(folder).predict_proba(paths, **vars(QUIET))
    np.testing.assert_array_equal(before, after)
    assert set(load_file(folder / "head.safetensors")) == set(model.head.network_.state_dict()) | {"classes_"}


def untrained(image_folder, **params):
    """A scratch head whose time budget ends before the first step: its weights are the initial ones."""
    paths = sorted(image_folder.rglob("*.png"))
    y = np.array([p.parent.name for p in paths])
    head = ScratchHead(max_time=1e-9, **params)
    return head.attach(create_backbone(TINY_BACKBONE, pretrained=False), progress=False).fit(paths, y)


def test_first_layer_starts_with_the_kaiming_std(image_folder):
    head = untrained(image_folder)
    first = head.network_.body.conv1[0].weight  # 16 x 3 x 3 x 3: fan-in 27
    assert first.std().item() == pytest.approx(math.sqrt(2 / 27), rel=0.15)
    classifier = head.network_.classifier.weight
    assert classifier.std().item() == pytest.approx(math.sqrt(2 / classifier.shape[1]), rel=0.15)
    assert head.network_.dropout.p == 0.2


def test_arch_trains_another_timm_architecture(image_folder):
    head = untrained(image_folder, arch="test_efficientnet")
    assert type(head.network_.body).__name__ == "EfficientNet"
    with pytest.raises(XferkitError, match="unknown backbone"):
        untrained(image_folder, arch="no_such_net")


@pytest.mark.parametrize("params, message", [
    ({"lr": -0.1}, "lr must be positive"),
    ({"epochs": 0}, "epochs must be positive"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
])
def test_bad_hyper_parameters_are_clear_errors(image_folder, params, message):
    with pytest.raises(XferkitError, match=message):
        untrained(image_folder, **params)


@pytest.mark.parametrize("n, asked, used", [(400, 64, 33), (30, 64, 8), (100_000, 64, 64), (400, 16, 16)])
def test_small_data_trains_in_smaller_batches_for_enough_steps(n, asked, used):
    assert training_batch_size(n, asked) == used


def test_small_validation_sets_are_decoded_once(image_folder, monkeypatch):
    paths = sorted(image_folder.rglob("*.png"))
    preprocess = create_backbone(TINY_BACKBONE, pretrained=False).preprocess
    kept = training.validation_batches(paths, preprocess, torch.device("cpu"), 8, 0)
    assert isinstance(kept, list) and sum(len(index) for index, _, _ in kept) == len(paths)
    monkeypatch.setattr(training, "VALIDATION_IN_MEMORY", 1000)  # less than 30 images of 32 x 32
    assert isinstance(training.validation_batches(paths, preprocess, torch.device("cpu"), 8, 0), DataLoader)


def test_training_uses_the_smaller_batch(image_folder):
    paths = sorted(image_folder.rglob("*.png"))
    y = np.array([p.parent.name for p in paths])
    head = ScratchHead(epochs=1).attach(create_backbone(TINY_BACKBONE, pretrained=False), batch_size=64,
                                        progress=False)
    assert head.fit(paths, y).history_["batch_size"] == 8  # 30 images: 3 steps, not one batch of 30


def test_early_stopping_ignores_the_first_half_of_the_schedule(image_folder, monkeypatch):
    """A from-scratch run whose untrained first epoch has the lowest validation loss keeps training.

    Keeping that epoch, or stopping on it, handed back a network at chance.
    """
    losses = iter([0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])  # epoch 1 looks best, then it only gets worse
    monkeypatch.setattr(training, "validate", lambda *args: (next(losses), 0.5))
    paths = sorted(image_folder.rglob("*.png"))
    y = np.array([p.parent.name for p in paths])
    head = ScratchHead(epochs=8, patience=1).attach(create_backbone(TINY_BACKBONE, pretrained=False),
                                                    batch_size=8, progress=False)
    history = head.fit(paths, y, paths, y).history_
    assert history["best_epoch"] == 5  # the first epoch of the second half of the schedule
    assert history["epochs_run"] == 6 and history["stopped"] == "patience"
