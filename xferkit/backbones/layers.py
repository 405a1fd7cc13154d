"""Features from an intermediate layer, global-average-pooled, through timm's and torchvision's own APIs.

timm models expose their stages (``feature_info``) to ``forward_intermediates``; torchvision
models are traced by ``create_feature_extractor``, which accepts any node name.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from xferkit.core.errors import XferkitError


def pooled(out: torch.Tensor) -> torch.Tensor:
    """Global average pool of a feature map ``(n, c, h, w)`` or token sequence ``(n, t, c)``."""
    if out.ndim == 4:
        return out.float().mean(dim=(2, 3))
    if out.ndim == 3:
        return out.float().mean(dim=1)
    return out.flatten(1)


class TimmStage(nn.Module):
    """A timm model cut after stage *index* (later stages pruned), its output pooled."""

    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        model.prune_intermediate_layers(indices=[index], prune_norm=True, prune_head=True)
        self.model, self.index = model, index
        self.num_features = model.feature_info[index]["num_chs"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True)[0])


class TracedLayer(nn.Module):
    """A torchvision model traced up to *layer* (a module's last operation, or a node), its output pooled."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model = create_feature_extractor(model.eval(), return_nodes={layer: "out"})
        with torch.no_grad():
            self.num_features = self(torch.zeros(1, 3, 64, 64)).shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled(self.model(x)["out"])


def timm_layers(model: nn.Module) -> list[str]:
    """The stage names of a timm model (usable with ``--layer``)."""
    return [info["module"] for info in getattr(model, "feature_info", None) or []]


def torchvision_layers(model: nn.Module) -> list[str]:
    """The module names of a torchvision model (each stands for its last traced operation)."""
    return [name for name, _ in model.named_modules() if name]


def cut_at_layer(model: nn.Module, layer: str, timm_model: bool) -> nn.Module:
    """*model* up to *layer* (a stage name or index for timm, a node name for torchvision), pooled."""
    names = timm_layers(model) if timm_model else torchvision_layers(model)
    if timm_model and layer.isdigit() and int(layer) < len(names):
        layer = names[int(layer)]
    if not timm_model and layer not in names:  # any traced operation is a layer too
        names += get_graph_node_names(model.eval())[1]
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=5)
        raise XferkitError(f"the backbone has no layer {layer!r}"
                           + (f"; did you mean {', '.join(close)}?" if close else ".")
                           + " `xferkit backbones NAME --layers` lists them.")
    if not timm_model:
        return TracedLayer(model, layer)
    if not hasattr(model, "forward_intermediates"):
        raise XferkitError(f"{type(model).__name__} does not expose intermediate layers in this timm "
                           "version; drop --layer or pick another backbone.")
    return TimmStage(model, names.index(layer))
