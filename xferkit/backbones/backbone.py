"""A feature extractor and what identifies it: name, weights digest, layer and preprocessing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from xferkit.preprocess import Preprocess


@dataclass
class Backbone:
    """``model(images) -> (batch, num_features)`` in eval mode, with its preprocessing and provenance."""

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


def state_digest(model: nn.Module) -> str:
    """sha256 over the model's tensors: the identity of its weights, whatever file they came from."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
