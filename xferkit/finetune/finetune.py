"""Fine-tuning: a new classifier trained together with the last blocks of a pretrained backbone."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from numbers import Integral, Real
from typing import ClassVar

from sklearn.utils._param_validation import Interval, StrOptions

from xferkit.backbones import Backbone, create_backbone
from xferkit.core.errors import InvalidParameter
from xferkit.finetune.base import PixelClassifier
from xferkit.finetune.loop import adamw_groups
from xferkit.finetune.network import ImageClassifier, RandomFreeze, parameter_blocks


class _BlockCount(StrOptions):
    """``"all"``, or a number of blocks written in digits (as a command line passes it)."""

    def __init__(self):
        super().__init__({"all"})

    def is_satisfied_by(self, val) -> bool:
        return super().is_satisfied_by(val) or isinstance(val, str) and val.isascii() and val.isdigit()

    def __str__(self) -> str:
        return "a str of digits or 'all'"


class FinetuneClassifier(PixelClassifier):
    """Train a pretrained backbone's last ``unfreeze`` blocks and a new linear classifier on augmented pixels.

    Parameters
    ----------
    backbone : str, default="resnet18"
        The pretrained network to start from: a timm model name, or tv:NAME[.WEIGHTS] for torchvision.
    weights : str or None, default=None
        A local checkpoint (safetensors or torch state dict) to use instead of the published weights.
    pretrained : bool, default=True
        Start from pretrained weights; False starts from a seeded random initialisation.
    layer : str or None, default=None
        Cut the backbone after this layer (its output pooled) instead of using all of it.
    image_size : int or None, default=None
        Square input size in pixels instead of the backbone's own.
    unfreeze : str or int, default="all"
        How many of the backbone's last blocks train: "0" (classifier only), a number, or "all".
    lr : float, default=3e-3
        Peak learning rate of the classifier (after warm-up, before the cosine decay).
    backbone_lr_mult : float, default=0.3
        The backbone trains at lr times this.
    weight_decay : float, default=0.01
        AdamW weight decay (none on biases and norms).
    epochs : int, default=10
        Most epochs to train.
    label_smoothing : float, default=0.0
        Label smoothing of the training loss, in [0, 1).
    random_freeze : float or None, default=None
        Also keep this random fraction of every trained backbone tensor fixed (xfer's random freeze).
    max_time : float or None, default=None
        Stop training after this many seconds.
    patience : int, default=3
        Stop after this many epochs without a lower validation loss (in the schedule's second half).
    validation_fraction : float, default=0.1
        Fraction of each class held out for early stopping; 0 trains every epoch.
    device : str, default="auto"
        Where to train and predict: auto, cpu, cuda or cuda:N.
    batch_size : int, default=64
        Most images per training step, and images per prediction batch.
    workers : int or None, default=None
        Image-decoding worker processes; None picks a number for the device.
    random_state : int or None, default=None
        Seed of the hold-out, the augmentation, the classifier's initialisation and the random freeze.
    sync_batchnorm : bool, default=False
        Under torchrun (GPUs), batch norm uses the statistics of the global batch (SyncBatchNorm).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels seen in fit, in the order of predict_proba's columns.
    backbone_ : Backbone
        The pretrained backbone the network started from (its spec is what save records).
    network_ : ImageClassifier
        The trained network, on the CPU and in eval mode.
    history_ : dict
        Losses and accuracies per epoch, why training stopped, the best epoch and the time taken.
    """

    name: ClassVar[str] = "finetune"
    _parameter_constraints: ClassVar[dict] = {
        **PixelClassifier._parameter_constraints,
        "weights": [str, os.PathLike, None],
        "pretrained": ["boolean"],
        "layer": [str, None],
        "unfreeze": [_BlockCount(), Interval(Integral, 0, None, closed="left")],
        "backbone_lr_mult": [Interval(Real, 0, None, closed="neither")],
        "random_freeze": [Interval(Real, 0, 1, closed="left"), None],
    }

    def __init__(self, backbone: str = "resnet18", weights: str | None = None, pretrained: bool = True,
                 layer: str | None = None, image_size: int | None = None, unfreeze: str | int = "all",
                 lr: float = 3e-3, backbone_lr_mult: float = 0.3, weight_decay: float = 0.01,
                 epochs: int = 10, label_smoothing: float = 0.0, random_freeze: float | None = None,
                 max_time: float | None = None, patience: int = 3, validation_fraction: float = 0.1,
                 device: str = "auto", batch_size: int = 64, workers: int | None = None,
                 random_state: int | None = None, sync_batchnorm: bool = False):
        self.backbone = backbone
        self.weights = weights
        self.pretrained = pretrained
        self.layer = layer
        self.image_size = image_size
        self.unfreeze = unfreeze
        self.lr = lr
        self.backbone_lr_mult = backbone_lr_mult
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.label_smoothing = label_smoothing
        self.random_freeze = random_freeze
        self.max_time = max_time
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.random_state = random_state
        self.sync_batchnorm = sync_batchnorm

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
                "unfreeze": trial.suggest_categorical("unfreeze", ["0", "1", "2", "all"]),
                "backbone_lr_mult": trial.suggest_float("backbone_lr_mult", 0.01, 1.0, log=True),
                "weight_decay": trial.suggest_float("weight_decay", 1e-4, 0.1, log=True),
                "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2)}

    def _create_backbone(self) -> Backbone:
        return create_backbone(self.backbone, weights=self.weights, pretrained=self.pretrained,
                               layer=self.layer, image_size=self.image_size)

    def _build_network(self, backbone: Backbone, num_classes: int) -> ImageClassifier:
        body = copy.deepcopy(backbone.model)
        blocks = parameter_blocks(body)
        trained = unfrozen_count(self.unfreeze, len(blocks), backbone.name)
        frozen = [name for block in blocks[:len(blocks) - trained] for name in block]
        return ImageClassifier(body, num_classes, frozen=frozen)

    def _prepare_training(self, network: ImageClassifier, seed: int) -> tuple[list[dict], Callable | None]:
        groups = (adamw_groups(network.classifier, self.lr, self.weight_decay)
                  + adamw_groups(network.body, self.lr * self.backbone_lr_mult, self.weight_decay))
        if not self.random_freeze:
            return groups, None
        trained = [p for p in network.body.parameters() if p.requires_grad]
        return groups, RandomFreeze(trained, self.random_freeze, seed).step


def unfrozen_count(unfreeze: str | int, blocks: int, backbone: str) -> int:
    """How many of the last *blocks* train: a number of them, or "all"."""
    if unfreeze == "all":
        return blocks
    if int(unfreeze) > blocks:
        raise InvalidParameter(f"unfreeze={unfreeze!r} is more than the {blocks} blocks of {backbone}; "
                               f"use at most {blocks}, or 'all'.")
    return int(unfreeze)
