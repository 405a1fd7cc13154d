"""The finetune trainer: learns from pixels, trains only the unfrozen blocks, and saves only those."""

import ast
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, write_image_folder
from safetensors.torch import load_file
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

import xferkit.finetune
from xferkit.backbones import create_backbone
from xferkit.core.errors import InvalidParameter, XferkitError
from xferkit.finetune import FinetuneClassifier, PixelClassifier, ScratchClassifier
from xferkit.finetune.network import parameter_blocks

#: The tiny backbone at 32 px, quiet and in the test process: fast enough for the default suite.
TINY = {"backbone": TINY_BACKBONE, "pretrained": False, "image_size": 32, "batch_size": 8, "workers": 0}


def colour_paths(folder):
    paths = sorted(folder.rglob("*.png"))
    return paths, np.array([p.parent.name for p in paths])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finetune run (last block unfrozen) on the colour folder, saved; plus a held-out test folder."""
    root = tmp_path_factory.mktemp("finetune")
    paths, y = colour_paths(write_image_folder(root / "data", per_class=10))
    done = []
    trainer = FinetuneClassifier(**TINY, unfreeze="1", epochs=4, lr=1e-2, random_state=0)
    trainer.fit(paths, y, progress=lambda *call: done.append(call))
    trainer.save(root / "model")
    return trainer, root / "model", write_image_folder(root / "test", per_class=5, seed=3), done


def fresh_backbone():
    return create_backbone(TINY_BACKBONE, pretrained=False)


def fit_direct(image_folder, **params):
    paths, y = colour_paths(image_folder)
    return FinetuneClassifier(**{**TINY, "epochs": 1, "lr": 1e-2, "random_state": 0, **params}).fit(paths, y)


def test_learns_the_colour_folder_with_valid_probabilities_and_string_labels(trained):
    trainer, _, test, _ = trained
    paths, y = colour_paths(test)
    proba = trainer.predict_proba(paths)
    assert list(trainer.classes_) == ["blue", "green", "red"]
    assert (trainer.predict(paths) == y).mean() >= 0.9
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5) and proba.min() >= 0.0
    assert trainer.uncertainty(paths)["entropy"].shape == (len(paths),)
    history = trainer.history_
    assert history["epochs_run"] == 4 and len(history["val_loss"]) == 4 and history["batch_size"] == 8
    json.dumps(history)


def test_progress_reports_every_step_in_order(trained):
    _, _, _, done = trained
    steps = [d for d, _, _ in done]
    assert steps == sorted(steps) and steps[0] == 1
    assert steps[-1] == done[-1][1] == 4 * 3  # 4 epochs of 27 training images, 8 a step
    assert "epoch 1/4 loss" in done[0][2] and "s/epoch" in done[-1][2]
    assert any("val_loss" in info and "val_acc" in info for _, _, info in done)


def test_save_load_gives_identical_predictions(trained):
    trainer, folder, test, _ = trained
    paths, _ = colour_paths(test)
    loaded = PixelClassifier.load(folder)
    assert isinstance(loaded, FinetuneClassifier) and loaded.get_params() == trainer.get_params()
    np.testing.assert_array_equal(loaded.predict_proba(paths), trainer.predict_proba(paths))
    assert loaded.classes_.dtype == trainer.classes_.dtype and loaded.history_ == trainer.history_
    assert FinetuneClassifier.load(folder).backbone_.spec() == trainer.backbone_.spec()
    with pytest.raises(XferkitError, match="holds a finetune model"):
        ScratchClassifier.load(folder)


def test_only_the_unfrozen_block_changes_and_only_it_is_saved(trained):
    trainer, folder, _, _ = trained
    base = fresh_backbone().model.state_dict()
    tuned = trainer.network_.body.state_dict()
    outside = [k for k in base if not k.startswith("layer4.")]
    assert outside and all(torch.equal(base[k], tuned[k]) for k in outside)  # batch-norm statistics too
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k.startswith("layer4."))
    assert all(torch.equal(v, trainer.backbone_.model.state_dict()[k]) for k, v in base.items())
    block = {f"body.{k}" for k in base if k.startswith("layer4.")}
    assert set(load_file(folder / "head.safetensors")) == block | {"classifier.weight", "classifier.bias"}


def copy_with_manifest(folder, tmp_path, edit):
    copy = shutil.copytree(folder, tmp_path / "model")
    manifest = json.loads((copy / "head.json").read_text())
    edit(manifest)
    (copy / "head.json").write_text(json.dumps(manifest))
    return copy


def test_load_refuses_other_base_weights(trained, tmp_path):
    _, folder, _, _ = trained

    def other_digest(manifest):
        manifest["info"]["backbone"]["weights_digest"] = "0" * 64
    with pytest.raises(XferkitError, match="not the ones this model was trained on"):
        PixelClassifier.load(copy_with_manifest(folder, tmp_path, other_digest))


def test_load_of_a_missing_or_damaged_folder_names_it(trained, tmp_path):
    _, folder, _, _ = trained
    with pytest.raises(XferkitError, match="nowhere"):
        PixelClassifier.load(tmp_path / "nowhere")
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    (damaged / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(XferkitError, match="damaged"):
        PixelClassifier.load(damaged)
    with pytest.raises(XferkitError, match="unknown pixel trainer 'bnn'"):
        PixelClassifier.load(copy_with_manifest(folder, tmp_path, lambda m: m.update(name="bnn")))


def test_clone_is_an_unfitted_copy_with_the_same_params(trained):
    trainer, _, _, _ = trained
    copy = clone(trainer)
    assert copy.get_params() == trainer.get_params() and not hasattr(copy, "network_")
    with pytest.raises(ValueError, match="not fitted"):
        check_is_fitted(copy)


def test_same_random_state_gives_identical_weights(image_folder):
    first, second = (fit_direct(image_folder, unfreeze="1").network_.state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("unfreeze, prefixes", [("0", ()), ("all", ("",))])
def test_unfreeze_extremes_save_classifier_only_or_everything(image_folder, unfreeze, prefixes):
    trainer = fit_direct(image_folder, unfreeze=unfreeze, max_time=1e-9)  # the key set needs no training
    assert trainer.history_["stopped"] == "max_time"
    body = {f"body.{k}" for k in fresh_backbone().model.state_dict() if k.startswith(prefixes)}
    assert set(trainer.network_.learned_state()) == body | {"classifier.weight", "classifier.bias"}


def test_random_freeze_keeps_that_fraction_of_the_trained_block(image_folder):
    base = fresh_backbone().model.state_dict()
    keys = [k for k in base if k.startswith("layer4.") and base[k].is_floating_point() and "running" not in k]

    def unchanged_fraction(trainer):
        tuned = trainer.network_.body.state_dict()
        return sum(int((tuned[k] == base[k]).sum()) for k in keys) / sum(base[k].numel() for k in keys)

    half_frozen = fit_direct(image_folder, unfreeze="1", random_freeze=0.5)
    assert unchanged_fraction(half_frozen) == pytest.approx(0.5, abs=0.05)
    assert unchanged_fraction(fit_direct(image_folder, unfreeze="1")) < 0.05


@pytest.mark.parametrize("params, message", [
    ({"lr": -1.0}, "'lr' parameter"),
    ({"unfreeze": "two"}, "'unfreeze' parameter .* digits or 'all'"),
    ({"random_freeze": 1.5}, "'random_freeze' parameter"),
    ({"label_smoothing": 1.0}, "'label_smoothing' parameter"),
    ({"backbone_lr_mult": 0.0}, "'backbone_lr_mult' parameter"),
    ({"validation_fraction": 1.0}, "'validation_fraction' parameter"),
])
def test_bad_hyper_parameters_are_clear_errors_before_any_work(params, message):
    with pytest.raises(InvalidParameter, match=message):
        FinetuneClassifier(**{**TINY, **params}).fit(["never-read.png"] * 2, ["a", "b"])


@pytest.mark.parametrize("params, message", [
    ({"unfreeze": "9"}, "more than the 5 blocks of test_resnet"),
    ({"backbone": "no_such_net"}, "unknown backbone"),
])
def test_what_depends_on_the_backbone_is_a_clear_error_too(params, message):
    with pytest.raises(XferkitError, match=message):
        FinetuneClassifier(**{**TINY, **params}).fit(["never-read.png"] * 2, ["a", "b"])


def test_blocks_follow_timm_groups_and_torchvision_features():
    def tops(blocks):
        return [sorted({name.split(".")[0] for name in block}) for block in blocks]
    assert tops(parameter_blocks(fresh_backbone().model)) == [
        ["bn1", "conv1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    cut = create_backbone(TINY_BACKBONE, pretrained=False, layer="layer2").model
    assert [block[0] for block in parameter_blocks(cut)] == [
        "model.conv1.0.weight", "model.layer1.0.conv1.weight", "model.layer2.0.conv1.weight"]
    blocks = parameter_blocks(create_backbone("tv:mobilenet_v2", pretrained=False).model)
    assert len(blocks) == 19 and all(name.startswith("features.0.") for name in blocks[0])
    assert all(name.startswith("features.18.") for name in blocks[-1])


def test_unreadable_images_are_skipped_in_training_and_prediction(image_folder):
    (image_folder / "red" / "broken.png").write_bytes(b"not an image")
    paths, y = colour_paths(image_folder)
    trainer = fit_direct(image_folder, unfreeze="0", validation_fraction=0.0)
    assert trainer.history_["train_loss"][0] is not None and trainer.history_["val_loss"] == []
    proba, feats = trainer.predict_images(paths, batch_size=8, workers=0)
    assert len(proba) == len(feats.kept) == len(paths) - 1
    assert [p.name for p, _ in feats.skipped] == ["broken.png"]
    with pytest.raises(XferkitError, match="broken.png"):
        trainer.predict_proba(paths)


@pytest.mark.parametrize("trainer", [FinetuneClassifier, ScratchClassifier])
def test_docstring_lists_every_parameter_with_its_default_on_one_line(trainer):
    lines = inspect.cleandoc(trainer.__doc__).splitlines()
    documented = [(i, re.fullmatch(r"(\w+) : .+, default=(.+)", line)) for i, line in enumerate(lines)]
    documented = [(i, match) for i, match in documented if match]
    signature = inspect.signature(trainer).parameters
    assert [match[1] for _, match in documented] == list(signature)
    for i, match in documented:
        assert ast.literal_eval(match[2]) == signature[match[1]].default
        assert lines[i + 1].startswith("    ") and not lines[i + 2].startswith(" ")
    assert "Attributes" in lines


def test_the_package_is_import_light_and_stays_in_its_layer():
    script = "import sys, xferkit.finetune; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", script], check=True)
    above = ("rich", "xferkit.heads", "xferkit.model", "xferkit.api", "xferkit.cli")
    for source in Path(xferkit.finetune.__file__).parent.glob("*.py"):
        nodes = list(ast.walk(ast.parse(source.read_text())))
        imported = [alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names]
        imported += [node.module for node in nodes if isinstance(node, ast.ImportFrom)]
        imported += [node.value for node in nodes  # lazy imports name their module in a string
                     if isinstance(node, ast.Constant) and str(node.value).startswith("xferkit.")]
        assert not [name for name in imported if name.startswith(above)], source
        assert not [node for node in nodes if isinstance(node, ast.Name) and node.id == "print"], source
