"""Headless backbones from timm (any model name) or torchvision (``tv:NAME[.WEIGHTS]``), with weights."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from xferkit.backbones.backbone import Backbone, state_digest
from xferkit.backbones.layers import cut_at_layer, timm_layers, torchvision_layers
from xferkit.backbones.weights import (
    PublishedFile,
    ResolvedWeights,
    find_local,
    load_checkpoint,
    read_state_dict,
    resolve_weights,
)
from xferkit.core.errors import XferkitError
from xferkit.core.reporting import SILENT, Reporter
from xferkit.preprocess import Preprocess

TV_PREFIX = "tv:"
#: Files timm looks for in a model's Hugging Face repository, in its order.
HF_FILES = ("model.safetensors", "pytorch_model.bin")


def create_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True,
                    layer: str | None = None, image_size: int | None = None,
                    reporter: Reporter = SILENT) -> Backbone:
    """Build backbone *name* headless and in eval mode, with weights from the first source that has them.

    ``pretrained=False`` gives a seeded random initialisation (the same every time, so its
    features can be cached); it is never chosen silently. ``layer`` cuts the network after that
    layer and pools it; ``image_size`` overrides the input size of the backbone's preprocessing.
    """
    builder = _torchvision_model if name.startswith(TV_PREFIX) else _timm_model
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, preprocess, resolved, name = builder(name, weights, pretrained, reporter)
    digest = state_digest(model)
    if layer is not None:
        model = cut_at_layer(model, layer, timm_model=not name.startswith(TV_PREFIX))
    if image_size:
        preprocess = preprocess.with_image_size(image_size)
    reporter.note(f"backbone {name}: {resolved.source}")
    return Backbone(name, model.eval().requires_grad_(False), preprocess, resolved.source, digest,
                    str(Path(weights).resolve()) if weights is not None else None, pretrained, layer)


def _timm_model(name: str, weights, pretrained: bool, reporter: Reporter):
    arch = timm.models.split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        raise _unknown(name, timm.list_models())
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as err:  # timm's answer to an unknown pretrained tag such as resnet18.x
        raise XferkitError(f"unknown backbone {name!r}: {str(err).splitlines()[0]} "
                           "`xferkit backbones PATTERN --published` lists the tagged names.") from None
    resolved = resolve_weights(name, timm_published(model.pretrained_cfg), weights, pretrained, reporter)
    if weights is not None:
        classifier = model.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        load_checkpoint(model, resolved.path, classifier)
    elif resolved.path is not None:  # timm's own loader: it applies the model's checkpoint filters
        model = timm.create_model(name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(resolved.path)})
    cfg = timm.data.resolve_model_data_config(model)
    preprocess = Preprocess(tuple(cfg["input_size"][1:]), cfg["interpolation"], tuple(cfg["mean"]),
                            tuple(cfg["std"]), cfg["crop_pct"])
    return model, preprocess, resolved, name


def timm_published(cfg: dict) -> list[PublishedFile]:
    """Where timm publishes a model's weights: its Hugging Face repository, else a URL."""
    files = [PublishedFile(f, hf_hub_id=cfg["hf_hub_id"]) for f in HF_FILES] if cfg.get("hf_hub_id") else []
    if cfg.get("url"):
        files.append(PublishedFile(cfg["url"].rsplit("/", 1)[-1], url=cfg["url"]))
    return files


def _torchvision_model(name: str, weights, pretrained: bool, reporter: Reporter):
    arch, _, tag = name[len(TV_PREFIX):].partition(".")
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise _unknown(name, [TV_PREFIX + m for m in known])
    entries = torchvision_weights(arch)
    if tag and tag not in {w.name for w in entries}:
        raise XferkitError(f"torchvision has no weights {tag!r} for {arch}; "
                           f"choose one of {', '.join(w.name for w in entries)}.")
    if tag:
        entries = [w for w in entries if w.name == tag]
    published = torchvision_published(entries)
    resolved = resolve_weights(name, published, weights, pretrained, reporter)
    model = torchvision.models.get_model(arch, weights=None)
    chosen = _chosen_weights(entries, resolved, reporter)
    if weights is not None:
        load_checkpoint(model, resolved.path, (_remove_classifier(model),))
    else:
        if resolved.path is not None:
            model.load_state_dict(read_state_dict(resolved.path))
            name = f"{TV_PREFIX}{arch}.{chosen.name}"
        _remove_classifier(model)
    transforms = chosen.transforms()
    crop = transforms.crop_size[0]
    preprocess = Preprocess((crop, crop), transforms.interpolation.value, tuple(transforms.mean),
                            tuple(transforms.std), crop / transforms.resize_size[0])
    return model, preprocess, resolved, name


def torchvision_weights(arch: str) -> list:
    """torchvision's published weights for *arch*, its default first."""
    enum = torchvision.models.get_model_weights(arch)
    return [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]


def torchvision_published(entries: list) -> list[PublishedFile]:
    """The files of torchvision weights *entries*, named as torch hub saves them."""
    return [PublishedFile(w.url.rsplit("/", 1)[-1], url=w.url, tag=w.name) for w in entries]


def _chosen_weights(entries: list, resolved: ResolvedWeights, reporter: Reporter):
    """The torchvision weights whose preprocessing applies: the file's own where it is a published one."""
    if resolved.published is not None:
        return next(w for w in entries if w.name == resolved.published.tag)
    if resolved.path is not None:  # a file of the user's own: the preprocessing is an assumption
        reporter.note(f"{resolved.path} is not a published torchvision file: using the preprocessing of "
                      f"{entries[0]} (name tv:ARCH.TAG to choose another)")
    return entries[0]


def _remove_classifier(model: nn.Module) -> str:
    """Replace the last Linear layer by Identity, so the model returns pre-logit features."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise XferkitError(f"{type(model).__name__} has no linear classifier to remove; "
                           "pick another backbone, or a timm model of the same family.")
    name, linear = linears[-1]
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
    model.num_features = linear.in_features
    return name


def _unknown(name: str, known: list[str]) -> XferkitError:
    close = difflib.get_close_matches(name, known, n=5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return XferkitError(f"unknown backbone {name!r}.{hint} "
                        "`xferkit backbones PATTERN` lists the available names.")


def layer_names(name: str) -> list[str]:
    """Names usable with ``--layer`` for backbone *name*: timm stages, or torchvision graph nodes."""
    model = create_backbone(name, pretrained=False).model
    return torchvision_layers(model) if name.startswith(TV_PREFIX) else timm_layers(model)


@dataclass(frozen=True)
class BackboneListing:
    """A backbone name, whether weights are published for it, and where they are found without a download."""

    name: str
    published: bool
    local: str | None

    def to_json(self) -> dict:
        return {"name": self.name, "published": self.published, "local": self.local}


def list_backbones(pattern: str = "", published_only: bool = False, local_only: bool = False
                   ) -> list[BackboneListing]:
    """timm and ``tv:`` torchvision names matching *pattern* (a glob, or a substring), marked with
    whether weights are published and where they are available locally (no download needed)."""
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    with_weights = set(timm.list_models(pretrained=True))
    names = sorted(with_weights) if published_only else timm.list_models()
    listings = []
    for name in (n for n in names if fnmatch.fnmatch(n, glob)):
        published = name in with_weights or any(t.startswith(name + ".") for t in with_weights)
        cfg = timm.models.get_pretrained_cfg(name) if published else None
        files = timm_published(cfg.to_dict()) if cfg else []
        listings.append(BackboneListing(name, bool(files), _local(files)))
    for arch in torchvision.models.list_models(module=torchvision.models):
        name = TV_PREFIX + arch
        if not (fnmatch.fnmatch(name, glob) or fnmatch.fnmatch(arch, glob)):
            continue
        files = torchvision_published(torchvision_weights(arch))
        if files or not published_only:
            listings.append(BackboneListing(name, bool(files), _local(files)))
    return [item for item in listings if item.local or not local_only]


def _local(files: list[PublishedFile]) -> str | None:
    found = find_local(files) if files else None
    return found.source if found else None
