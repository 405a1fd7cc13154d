"""The scratch baseline: trains the backbone's architecture from He initialisation, no pretrained weights."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, write_image_folder
from safetensors.torch import load_file
from sklearn.base import clone
from torch.utils.data import DataLoader

from xferkit.backbones import create_backbone
from xferkit.core.errors import InvalidParameter, XferkitError
from xferkit.finetune import PixelClassifier, ScratchClassifier, loaders, loop, scratch
from xferkit.finetune.loaders import training_batch_size

#: The tiny architecture at 32 px, trained in the test process.
TINY = {"backbone": TINY_BACKBONE, "image_size": 32, "batch_size": 8, "workers": 0, "random_state": 0}


def colour_paths(folder):
    paths = sorted(folder.rglob("*.png"))
    return paths, np.array([p.parent.name for p in paths])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Scratch on the colour folder, saved and loaded, where asking for pretrained weights is an error."""
    root = tmp_path_factory.mktemp("scratch")

    def random_weights_only(name, **options):
        assert options.get("pretrained") is False, "the scratch trainer asked for pretrained weights"
        return create_backbone(name, **options)
    with pytest.MonkeyPatch.context() as env:
        env.setattr(scratch, "create_backbone", random_weights_only)
        data = write_image_folder(root / "data", per_class=10)
        trainer = ScratchClassifier(**TINY, epochs=4).fit(*colour_paths(data))
        trainer.save(root / "model")
        loaded = PixelClassifier.load(root / "model")
    return trainer, loaded, root / "model", write_image_folder(root / "test", per_class=5, seed=3)


def untrained(image_folder, **params):
    """A scratch trainer whose time budget ends before the first step: its weights are the initial ones."""
    return ScratchClassifier(**{**TINY, "max_time": 1e-9, **params}).fit(*colour_paths(image_folder))


def test_needs_no_pretrained_weights_and_records_so(trained):
    trainer, _, _, _ = trained
    spec = trainer.backbone_.spec()
    assert spec["pretrained"] is False and spec["weights_file"] is None and spec["name"] == TINY_BACKBONE


def test_learns_the_colour_folder_with_valid_probabilities(trained):
    trainer, _, _, test = trained
    paths, y = colour_paths(test)
    proba = trainer.predict_proba(paths)
    assert (trainer.classes_[proba.argmax(axis=1)] == y).mean() >= 0.8  # chance is 1/3
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5) and proba.min() >= 0.0


def test_save_load_gives_identical_predictions_and_saves_the_whole_network(trained):
    trainer, loaded, folder, test = trained
    paths, _ = colour_paths(test)
    assert isinstance(loaded, ScratchClassifier) and loaded.get_params() == trainer.get_params()
    np.testing.assert_array_equal(loaded.predict_proba(paths), trainer.predict_proba(paths))
    assert set(load_file(folder / "head.safetensors")) == set(trainer.network_.state_dict())


def test_clone_is_unfitted_with_the_same_params(trained):
    trainer, _, _, _ = trained
    copy = clone(trainer)
    assert copy.get_params() == trainer.get_params() and not hasattr(copy, "classes_")


def test_first_layer_starts_with_the_kaiming_std(image_folder):
    trainer = untrained(image_folder)
    first = trainer.network_.body.conv1[0].weight  # 16 x 3 x 3 x 3: fan-in 27
    assert first.std().item() == pytest.approx(math.sqrt(2 / 27), rel=0.15)
    classifier = trainer.network_.classifier.weight
    assert classifier.std().item() == pytest.approx(math.sqrt(2 / classifier.shape[1]), rel=0.15)
    assert trainer.network_.dropout.p == 0.2


def test_arch_trains_another_timm_architecture(image_folder):
    trainer = untrained(image_folder, arch="test_efficientnet")
    assert type(trainer.network_.body).__name__ == "EfficientNet"
    assert trainer.backbone_.name == TINY_BACKBONE  # which still gives the preprocessing
    with pytest.raises(XferkitError, match="unknown backbone"):
        untrained(image_folder, arch="no_such_net")


@pytest.mark.parametrize("params, message", [
    ({"lr": -0.1}, "'lr' parameter"),
    ({"epochs": 0}, "'epochs' parameter"),
    ({"dropout": 1.0}, "'dropout' parameter"),
    ({"weight_decay": -1.0}, "'weight_decay' parameter"),
    ({"random_state": -1}, "'random_state' parameter"),
])
def test_bad_hyper_parameters_are_clear_errors(params, message):
    with pytest.raises(InvalidParameter, match=message):
        ScratchClassifier(**{**TINY, **params}).fit(["never-read.png"] * 2, ["a", "b"])


@pytest.mark.parametrize("n, asked, used", [(400, 64, 33), (30, 64, 8), (100_000, 64, 64), (400, 16, 16)])
def test_small_data_trains_in_smaller_batches_for_enough_steps(n, asked, used):
    assert training_batch_size(n, asked) == used


def test_small_validation_sets_are_decoded_once(image_folder, monkeypatch):
    paths, _ = colour_paths(image_folder)
    preprocess = create_backbone(TINY_BACKBONE, pretrained=False).preprocess
    kept = loaders.validation_batches(paths, preprocess, torch.device("cpu"), 8, 0)
    assert isinstance(kept, list) and sum(len(index) for index, _, _ in kept) == len(paths)
    monkeypatch.setattr(loaders, "VALIDATION_IN_MEMORY", 1000)  # less than 30 images of 32 x 32
    assert isinstance(loaders.validation_batches(paths, preprocess, torch.device("cpu"), 8, 0), DataLoader)


def test_every_epoch_trains_without_a_hold_out_in_the_smaller_batch(image_folder):
    trainer = ScratchClassifier(**{**TINY, "batch_size": 64}, epochs=2, validation_fraction=0.0)
    history = trainer.fit(*colour_paths(image_folder)).history_
    assert history["batch_size"] == 8  # 30 images: 3 steps, not one batch of 30
    assert history["epochs_run"] == 2 and history["val_loss"] == [] and history["stopped"] == "epochs"


def test_early_stopping_ignores_the_first_half_of_the_schedule(image_folder, monkeypatch):
    """A from-scratch run whose untrained first epoch has the lowest validation loss keeps training.

    Keeping that epoch, or stopping on it, handed back a network at chance. The validation set is a
    stratified tenth of the images: one of each class.
    """
    losses = iter([0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])  # epoch 1 looks best, then it only gets worse
    held_out = []

    def validate(network, loader, labels, normalize):
        held_out.append(sorted(labels.tolist()))
        return next(losses), 0.5
    monkeypatch.setattr(loop, "validate", validate)
    history = ScratchClassifier(**TINY, epochs=8, patience=1).fit(*colour_paths(image_folder)).history_
    assert history["best_epoch"] == 5  # the first epoch of the second half of the schedule
    assert history["epochs_run"] == 6 and history["stopped"] == "patience"
    assert held_out[0] == [0, 1, 2]
