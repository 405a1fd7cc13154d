"""Headless backbones from timm (any model name) or torchvision (``tv:NAME``), with their weights.

Weights are resolved in a fixed order and the chosen source is reported: an explicit file,
the framework's own cache, an installed offline-weights package, a download, or a clear error.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from xferkit.errors import XferkitError
from xferkit.progress import console

TV_PREFIX = "tv:"
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Preprocess:
    """How images are resized, cropped and normalised for a backbone (from its own config)."""

    input_size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop, as timm and torchvision compute it."""
        return int(min(self.input_size) / self.crop_pct)

    def with_image_size(self, size: int) -> Preprocess:
        """Same preprocessing at another square input size (for small images on a CPU)."""
        return replace(self, input_size=(size, size))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocess:
        return cls(input_size=tuple(data["input_size"]), interpolation=data["interpolation"],
                   mean=tuple(data["mean"]), std=tuple(data["std"]), crop_pct=data["crop_pct"])


@dataclass
class Backbone:
    """A feature extractor: ``model(images) -> (batch, num_features)``, in eval mode."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    weights_source: str
    weights_digest: str
    weights_file: str | None = None
    pretrained: bool = True
    layer: str | None = None

    @property
    def num_features(self) -> int:
        return self.model.num_features

    def spec(self) -> dict:
        """What a saved model records to rebuild this exact backbone."""
        return {"name": self.name, "weights_digest": self.weights_digest,
                "weights_file": self.weights_file, "weights_source": self.weights_source,
                "pretrained": self.pretrained, "layer": self.layer,
                "preprocess": self.preprocess.to_json()}


def create_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True,
                    layer: str | None = None) -> Backbone:
    """Build backbone *name* headless, with weights from *weights* (a file) or the usual sources.

    ``pretrained=False`` gives a seeded random initialisation; it is never chosen silently.
    """
    if weights is not None and not pretrained:
        raise XferkitError("--weights and --no-pretrained contradict each other; pick one.")
    factory = _torchvision_backbone if name.startswith(TV_PREFIX) else _timm_backbone
    if not pretrained:
        torch.manual_seed(0)  # the same random backbone every time, so features are cacheable
    backbone = factory(name, Path(weights) if weights is not None else None, pretrained)
    if layer is not None:
        backbone.model = IntermediateLayer(backbone.model, layer)
        backbone.layer = layer
    backbone.model.eval().requires_grad_(False)
    return backbone


def _timm_backbone(name: str, weights: Path | None, pretrained: bool) -> Backbone:
    arch = timm.models.split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        raise _unknown(name, timm.list_models())
    model = timm.create_model(name, pretrained=False, num_classes=0)
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    if weights is not None:
        load_checkpoint(model, weights, classifier)
        source = f"file {weights}"
    elif not pretrained:
        source = "random initialisation (--no-pretrained)"
    else:
        model, source = _timm_pretrained(name, model.pretrained_cfg)
    cfg = timm.data.resolve_model_data_config(model)
    preprocess = Preprocess(tuple(cfg["input_size"][1:]), cfg["interpolation"],
                            tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"])
    return Backbone(name, model, preprocess, source, state_digest(model),
                    str(weights.resolve()) if weights else None, pretrained)


def _timm_pretrained(name: str, cfg: dict) -> tuple[nn.Module, str]:
    """Hugging Face cache first (HF_HOME / HF_HUB_CACHE), then a download unless HF_HUB_OFFLINE."""
    hub_id = cfg.get("hf_hub_id")
    cached = _hf_cached_file(hub_id) if hub_id else None
    if cached:
        model = timm.create_model(name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": cached})
        return model, f"Hugging Face cache {cached}"
    wanted = f"{hub_id} on the Hugging Face Hub" if hub_id else cfg.get("url") or "(none published)"
    if _offline():
        raise _missing_weights(name, wanted, "HF_HUB_OFFLINE is set, so nothing is downloaded")
    console.print(f"weights for {name} are not cached: downloading {wanted} "
                  "(HF_HUB_OFFLINE=1 skips this)", highlight=False)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # network, auth, missing file: all end in the same advice
        raise _missing_weights(name, wanted, f"the download failed ({type(err).__name__}: "
                                             f"{str(err).splitlines()[0] if str(err) else ''})") from err
    return model, f"downloaded {wanted}"


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                             "huggingface")
    return Path(home) / "hub"


def _hf_cached_file(hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in _HF_FILES:
        found = try_to_load_from_cache(hub_id, filename, cache_dir=_hf_cache_dir())
        if isinstance(found, str):
            return found
    return None


def _torchvision_backbone(name: str, weights: Path | None, pretrained: bool) -> Backbone:
    arch, _, tag = name[len(TV_PREFIX):].partition(".")
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise _unknown(name, [TV_PREFIX + m for m in known])
    enum = torchvision.models.get_model_weights(arch)
    if tag and tag not in enum.__members__:
        raise XferkitError(f"torchvision has no weights {tag!r} for {arch}; "
                           f"choose one of {', '.join(enum.__members__)}.")
    candidates = [enum[tag]] if tag else [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    model = torchvision.models.get_model(arch, weights=None)
    chosen = candidates[0]
    if weights is not None:
        classifier = _remove_classifier(model)
        load_checkpoint(model, weights, (classifier,))
        source = f"file {weights}"
    elif not pretrained:
        _remove_classifier(model)
        source = "random initialisation (--no-pretrained)"
    else:
        chosen, path, where = _torchvision_local_weights(arch, candidates)
        if path is None:
            path, where = _torchvision_download(name, chosen), "downloaded"
        model.load_state_dict(_read_state_dict(path))
        _remove_classifier(model)
        name = f"{TV_PREFIX}{arch}.{chosen.name}"
        source = f"{where} {path}"
    transforms = chosen.transforms()
    crop = transforms.crop_size[0]
    preprocess = Preprocess((crop, crop), transforms.interpolation.value, tuple(transforms.mean),
                            tuple(transforms.std), crop / transforms.resize_size[0])
    return Backbone(name, model, preprocess, source, state_digest(model),
                    str(weights.resolve()) if weights else None, pretrained)


def _torchvision_local_weights(arch: str, candidates: list) -> tuple:
    """Look for each candidate's file in the torch hub cache, then in installed packages."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for weights in candidates:
        filename = weights.url.rsplit("/", 1)[-1]
        if (hub / filename).is_file():
            return weights, hub / filename, "torch hub cache"
    for weights in candidates:
        filename = weights.url.rsplit("/", 1)[-1]
        found = _packaged_weights(filename)
        if found:
            return weights, found, "installed offline-weights package"
    return candidates[0], None, None


def _packaged_weights(filename: str) -> Path | None:
    """A file with torchvision's published name in any installed distribution, hash-checked."""
    prefix = filename.rsplit("-", 1)[-1].split(".")[0]
    for dist in metadata.distributions():
        for file in dist.files or ():
            if file.name == filename:
                path = Path(dist.locate_file(file))
                if path.is_file() and file_sha256(path).startswith(prefix):
                    return path
    return None


def _torchvision_download(name: str, weights) -> Path:
    filename = weights.url.rsplit("/", 1)[-1]
    wanted = f"{filename} (torchvision {weights})"
    if _offline():
        raise _missing_weights(name, wanted, "HF_HUB_OFFLINE is set, so nothing is downloaded")
    console.print(f"weights for {name} are not cached: downloading {wanted} "
                  "(HF_HUB_OFFLINE=1 skips this)", highlight=False)
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as err:
        raise _missing_weights(name, wanted, f"the download failed ({type(err).__name__})") from err
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


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


def load_checkpoint(model: nn.Module, path: Path, classifier: tuple[str, ...] = ()) -> None:
    """Load a local state dict strictly, ignoring only the old classifier's tensors."""
    state = _read_state_dict(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if k in own or not any(k == c or k.startswith(c + ".") for c in classifier)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        problems = [f"{label}: {few(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("keys with other shapes", wrong_shape)) if keys]
        raise XferkitError(f"{path} does not fit this backbone's architecture; "
                           + "; ".join(problems)
                           + ". Check that --backbone names the model the file was saved from.")
    model.load_state_dict(state)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a plain torch checkpoint (``weights_only=True``)."""
    if not Path(path).is_file():
        raise XferkitError(f"weights file {path} does not exist.")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise XferkitError(f"cannot read weights file {path}: {str(err).splitlines()[0]}. It must be "
                           "a safetensors file or a torch checkpoint of plain tensors.") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise XferkitError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


class IntermediateLayer(nn.Module):
    """Run the backbone only up to *layer* and global-average-pool that layer's output."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        modules = dict(model.named_modules())
        if layer not in modules or not layer:
            close = difflib.get_close_matches(layer, modules, n=5)
            raise XferkitError(f"the backbone has no layer {layer!r}"
                               + (f"; did you mean {', '.join(close)}?" if close else ".")
                               + " `xferkit backbones NAME --layers` lists them.")
        self.model, self.layer = model, layer
        with torch.no_grad():
            size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 64, 64))
            self.num_features = self(torch.zeros(1, *size)).shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured = {}

        def capture(module, args, output):
            captured["out"] = output
            raise _LayerReached

        handle = self.model.get_submodule(self.layer).register_forward_hook(capture)
        try:
            self.model(x)
        except _LayerReached:
            pass
        finally:
            handle.remove()
        out = captured["out"]
        if out.ndim == 4:
            return out.float().mean(dim=(2, 3))
        if out.ndim == 3:  # tokens: (batch, tokens, channels)
            return out.float().mean(dim=1)
        return out.flatten(1)


class _LayerReached(Exception):
    """Raised from a forward hook to stop the backbone once the wanted layer has run."""


def layer_names(name: str) -> list[str]:
    """Module names usable with ``--layer`` for backbone *name* (no weights loaded)."""
    return [n for n, _ in create_backbone(name, pretrained=False).model.named_modules() if n]


def list_backbones(pattern: str = "", pretrained_only: bool = False) -> list[str]:
    """timm model names (and ``tv:`` torchvision names) containing *pattern*."""
    found = timm.list_models(f"*{pattern}*" if pattern else "", pretrained=pretrained_only)
    tv = [TV_PREFIX + m for m in torchvision.models.list_models(module=torchvision.models)]
    return list(found) + [m for m in tv if pattern in m]


def state_digest(model: nn.Module) -> str:
    """sha256 over the model's tensors: the identity of its weights, whatever file they came from."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _unknown(name: str, known: list[str]) -> XferkitError:
    close = difflib.get_close_matches(name, known, n=5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return XferkitError(f"unknown backbone {name!r}.{hint} "
                        "`xferkit backbones PATTERN` lists the available names.")


def _missing_weights(name: str, wanted: str, why: str) -> XferkitError:
    return XferkitError(
        f"no pretrained weights for {name} are available here: {why}. Needed: {wanted}. "
        "Ways out: (1) pass a local checkpoint with --weights FILE (safetensors or a torch "
        "state dict); (2) put the weights in the cache (for timm, run once on a connected machine "
        "with the same HF_HOME; for torchvision, copy the file into $TORCH_HOME/hub/checkpoints); "
        "(3) unset HF_HUB_OFFLINE on a connected machine to download them; or (4) pass "
        "--no-pretrained to use random weights deliberately (a baseline, not transfer)."
    )
