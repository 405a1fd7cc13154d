"""The from-scratch baseline: the same network trained on pixels from random (He) initialisation."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from xferkit.backbones import Backbone, create_backbone
from xferkit.training import ImageClassifier, ImageHead, check_fraction, param_groups


class ScratchHead(ImageHead):
    """``--backbone``'s architecture (or timm's ``arch``) trained from Kaiming initialisation.

    No pretrained weight is ever used: its accuracy is what transfer is measured against.
    Preprocessing (input size, mean, std) still comes from ``--backbone`` and ``--image-size``.
    Some architectures learn slowly from scratch on small images and little data (MobileNetV2 on
    400 digits at 32 px: ~0.4 accuracy in 30 epochs, resnet10t ~0.9): ``arch="resnet10t"`` is then
    the fairer baseline.
    """

    name = "scratch"
    pretrained_weights = False

    def __init__(self, arch: str | None = None, lr: float = 3e-3, weight_decay: float = 0.05,
                 epochs: int = 30, dropout: float = 0.2, label_smoothing: float = 0.0,
                 max_time: float | None = None, patience: int = 5, seed: int = 0):
        self.arch = arch
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.dropout = dropout
        self.label_smoothing = label_smoothing
        self.max_time = max_time
        self.patience = patience
        self.seed = seed

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
                "weight_decay": trial.suggest_float("weight_decay", 1e-3, 0.3, log=True),
                "dropout": trial.suggest_float("dropout", 0.0, 0.5),
                "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2)}

    def _check_params(self) -> None:
        check_fraction(dropout=self.dropout)

    def _build_network(self, backbone: Backbone, num_classes: int) -> ImageClassifier:
        body = (create_backbone(self.arch, pretrained=False).model if self.arch
                else copy.deepcopy(backbone.model))
        return ImageClassifier(body, num_classes, dropout=self.dropout)

    def _prepare_training(self, network: ImageClassifier) -> tuple[list[dict], Callable | None]:
        he_init(network)
        return param_groups(network.parameters(), self.lr, self.weight_decay), None


def he_init(network: nn.Module) -> None:
    """Kaiming-normal (fan-in, ReLU gain) conv and linear weights, zero biases, norms reset to 1, 0."""
    for module in network.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            module.reset_parameters()
