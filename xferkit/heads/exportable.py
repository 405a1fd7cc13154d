"""What the heads' export modules share: constants as float32 tensors, and standardisation in torch.

``xferkit export`` puts a head's probabilities into an ONNX graph; these modules compute them from
raw backbone features in float32, as ``predict_proba`` does in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def constant(array) -> torch.Tensor:
    """*array* (numpy or torch, any float type) as a float32 tensor on the CPU."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().float()
    return torch.from_numpy(np.asarray(array, dtype=np.float32).copy())


class Standardised(nn.Module):
    """``inner((x - mean) / scale)``: a head's probabilities from raw features."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, inner: nn.Module):
        super().__init__()
        self.register_buffer("mean", constant(mean))
        self.register_buffer("scale", constant(scale))
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean) / self.scale)


def tempered(proba: torch.Tensor, temperature: float) -> torch.Tensor:
    """``xferkit.core.calibration.temper`` in torch: probabilities proportional to ``proba ** (1 / T)``."""
    if temperature == 1.0:
        return proba
    return torch.softmax(proba.clamp(1e-12, 1.0).log() / temperature, dim=-1)
