"""Pretrained backbones: build one by name, with its weights (resolved in one place) and preprocessing."""

from xferkit.backbones.backbone import Backbone, state_digest
from xferkit.backbones.factory import (
    TV_PREFIX,
    BackboneListing,
    create_backbone,
    layer_names,
    list_backbones,
)

__all__ = ["TV_PREFIX", "Backbone", "BackboneListing", "create_backbone", "layer_names", "list_backbones",
           "state_digest"]
