"""The finetune head: learns from pixels, trains only the unfrozen blocks, and saves only those."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, write_image_folder
from safetensors.torch import load_file
from typer.testing import CliRunner

from xferkit.backbones import create_backbone
from xferkit.cli import app
from xferkit.errors import XferkitError
from xferkit.heads.finetune import FinetuneHead, backbone_blocks
from xferkit.model import TransferModel
from xferkit.pipeline import BackboneOptions, ExtractOptions, evaluate, repurpose
from xferkit.training import readable_images

QUIET = ExtractOptions(batch_size=8, progress=False)
TINY = BackboneOptions(TINY_BACKBONE, pretrained=False, image_size=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finetune run (last block unfrozen) on the colour folder, saved; plus a held-out test folder."""
    root = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("XFERKIT_CACHE", str(root / "cache"))
        data = write_image_folder(root / "data", per_class=10)
        result = repurpose(data, TINY, "finetune", root / "model",
                           {"epochs": 3, "lr": 1e-2, "unfreeze": "1"}, options=QUIET)
    return result.model, root / "model", write_image_folder(root / "test", per_class=5, seed=3)


def fresh_backbone():
    return create_backbone(TINY_BACKBONE, pretrained=False)


def colour_paths(folder):
    paths = sorted(folder.rglob("*.png"))
    return paths, np.array([["blue", "green", "red"].index(p.parent.name) for p in paths])


def test_learns_the_colour_folder_with_valid_probabilities(trained):
    model, folder, test = trained
    report = evaluate(folder, test, QUIET)
    assert report.metrics["accuracy"] >= 0.9
    assert np.allclose(report.proba.sum(axis=1), 1.0, atol=1e-5)
    assert report.proba.min() >= 0.0 and report.proba.max() <= 1.0
    assert model.head.history_["epochs_run"] >= 1 and model.head.history_["val_loss"]


def test_save_load_gives_identical_predictions(trained):
    model, folder, test = trained
    paths, _ = colour_paths(test)
    before, _ = model.predict_proba(paths, **vars(QUIET))
    after, feats = TransferModel.load(folder).predict_proba(paths, **vars(QUIET))
    assert len(feats.kept) == len(paths)
    np.testing.assert_array_equal(before, after)


def test_only_the_unfrozen_block_changes_and_only_it_is_saved(trained):
    model, folder, _ = trained
    base = fresh_backbone().model.state_dict()
    tuned = model.head.network_.body.state_dict()
    outside = [k for k in base if not k.startswith("layer4.")]
    assert outside and all(torch.equal(base[k], tuned[k]) for k in outside)
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k.startswith("layer4."))
    # the model's own backbone is the untouched base network
    assert all(torch.equal(v, model.backbone.model.state_dict()[k]) for k, v in base.items())
    saved = set(load_file(folder / "head.safetensors"))
    expected = {f"body.{k}" for k in base if k.startswith("layer4.")}
    assert saved == expected | {"classifier.weight", "classifier.bias", "classes_"}


def test_load_refuses_other_base_weights(trained, tmp_path):
    _, folder, _ = trained
    copy = tmp_path / "model"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((copy / "model.json").read_text())
    manifest["backbone"]["weights_digest"] = "0" * 64
    (copy / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(XferkitError, match="not the ones"):
        TransferModel.load(copy)


def fit_direct(image_folder, **params):
    paths, y = colour_paths(image_folder)
    head = FinetuneHead(**{"epochs": 1, "lr": 1e-2, **params}).attach(fresh_backbone(), batch_size=8,
                                                                     progress=False)
    return head.fit(paths, y)


@pytest.mark.parametrize("unfreeze, prefixes", [("0", ()), ("all", ("",))])
def test_unfreeze_extremes_save_classifier_only_or_everything(image_folder, unfreeze, prefixes):
    head = fit_direct(image_folder, unfreeze=unfreeze, max_time=1e-9)  # the key set needs no training
    assert head.history_["stopped"] == "max_time"
    keys = set(head._get_state())
    body = {f"body.{k}" for k in fresh_backbone().model.state_dict() if k.startswith(prefixes)}
    assert keys == body | {"classifier.weight", "classifier.bias"}


def test_random_freeze_keeps_that_fraction_of_the_trained_block(image_folder):
    base = fresh_backbone().model.state_dict()
    keys = [k for k in base if k.startswith("layer4.") and base[k].is_floating_point()
            and "running" not in k]

    def unchanged_fraction(head):
        tuned = head.network_.body.state_dict()
        same = sum(int((tuned[k] == base[k]).sum()) for k in keys)
        return same / sum(base[k].numel() for k in keys)

    assert unchanged_fraction(fit_direct(image_folder, random_freeze=0.5)) == pytest.approx(0.5, abs=0.05)
    assert unchanged_fraction(fit_direct(image_folder)) < 0.05


@pytest.mark.parametrize("params, message", [
    ({"lr": -1.0}, "lr must be positive"),
    ({"unfreeze": "9"}, "more than the 5 blocks"),
    ({"unfreeze": "two"}, "number of blocks or 'all'"),
    ({"random_freeze": 1.5}, "random_freeze must be in"),
    ({"label_smoothing": 1.0}, "label_smoothing must be in"),
    ({"backbone_lr_mult": 0.0}, "backbone_lr_mult must be positive"),
])
def test_bad_hyper_parameters_are_clear_errors(image_folder, params, message):
    with pytest.raises(XferkitError, match=message):
        fit_direct(image_folder, **params)


def test_fit_without_a_backbone_says_what_to_do(image_folder):
    paths, y = colour_paths(image_folder)
    with pytest.raises(XferkitError, match="attach"):
        FinetuneHead().fit(paths, y)


def test_blocks_follow_timm_stages_and_torchvision_features():
    assert backbone_blocks(fresh_backbone().model) == [
        ["conv1", "bn1", "act1"], ["maxpool", "layer1"], ["layer2"], ["layer3"],
        ["layer4", "global_pool", "fc"]]
    blocks = backbone_blocks(create_backbone("tv:mobilenet_v2", pretrained=False).model)
    assert len(blocks) == 19 and blocks[0] == ["features.0"]
    assert blocks[-1] == ["features.18", "classifier"]


def test_unreadable_images_are_skipped_and_counted(image_folder):
    (image_folder / "red" / "broken.png").write_bytes(b"not an image")
    paths = sorted(image_folder.rglob("*.png"))
    kept, skipped = readable_images(paths, fresh_backbone().preprocess, progress=False)
    assert len(kept) == len(paths) - 1 and [p.name for p, _ in skipped] == ["broken.png"]
    with pytest.raises(XferkitError, match="--strict"):
        readable_images(paths, fresh_backbone().preprocess, strict=True, progress=False)


def test_cli_repurpose_evaluate_predict(image_folder, tmp_path):
    runner = CliRunner()
    model = tmp_path / "ft"

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return json.loads(result.stdout)

    summary = run("repurpose", image_folder, "-o", model, "--backbone", TINY_BACKBONE, "--no-pretrained",
                  "--image-size", "32", "--head", "finetune", "--epochs", "1", "--lr", "0.01",
                  "--batch-size", "8", "--json")
    assert summary["head"] == "finetune" and summary["head_params"]["unfreeze"] == "all"
    report = run("evaluate", model, image_folder, "--json")
    assert report["metrics"]["n"] == 30 and 0.0 <= report["metrics"]["accuracy"] <= 1.0
    predictions = run("predict", model, image_folder / "red", "--json")["predictions"]
    assert len(predictions) == 10 and "entropy" in predictions[0]["uncertainty"]
