"""The from-scratch baseline: the backbone's architecture trained on pixels from He initialisation."""

from __future__ import annotations

import copy
from collections.abc import Callable
from numbers import Real
from typing import ClassVar

from sklearn.utils._param_validation import Interval

from xferkit.backbones import Backbone, create_backbone
from xferkit.finetune.base import PixelClassifier
from xferkit.finetune.loop import adamw_groups
from xferkit.finetune.network import ImageClassifier, he_init


class ScratchClassifier(PixelClassifier):
    """The backbone's architecture (or timm's ``arch``) trained from Kaiming initialisation: no pretraining.

    Its accuracy is what transfer is measured against. Some architectures learn slowly from scratch
    on small images and little data (MobileNetV2 on 400 digits at 32 px: ~0.4 accuracy in 30 epochs,
    resnet10t ~0.9): ``arch="resnet10t"`` is then the fairer baseline.

    Parameters
    ----------
    backbone : str, default="resnet18"
        The architecture to train and the preprocessing (input size, mean, std) to use.
    arch : str or None, default=None
        Train this timm architecture instead, keeping the backbone's preprocessing.
    image_size : int or None, default=None
        Square input size in pixels instead of the backbone's own.
    lr : float, default=3e-3
        Peak learning rate (after warm-up, before the cosine decay).
    weight_decay : float, default=0.05
        AdamW weight decay (none on biases and norms).
    epochs : int, default=30
        Most epochs to train.
    dropout : float, default=0.2
        Dropout before the classifier, in [0, 1).
    label_smoothing : float, default=0.0
        Label smoothing of the training loss, in [0, 1).
    max_time : float or None, default=None
        Stop training after this many seconds.
    patience : int, default=5
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
        Seed of the hold-out, the augmentation, the initialisation and the dropout.
    sync_batchnorm : bool, default=False
        Under torchrun (GPUs), batch norm uses the statistics of the global batch (SyncBatchNorm).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels seen in fit, in the order of predict_proba's columns.
    backbone_ : Backbone
        The randomly initialised backbone that gives the preprocessing (its spec is what save records).
    network_ : ImageClassifier
        The trained network, on the CPU and in eval mode.
    history_ : dict
        Losses and accuracies per epoch, why training stopped, the best epoch and the time taken.
    """

    name: ClassVar[str] = "scratch"
    _parameter_constraints: ClassVar[dict] = {
        **PixelClassifier._parameter_constraints,
        "arch": [str, None],
        "dropout": [Interval(Real, 0, 1, closed="left")],
    }

    def __init__(self, backbone: str = "resnet18", arch: str | None = None, image_size: int | None = None,
                 lr: float = 3e-3, weight_decay: float = 0.05, epochs: int = 30, dropout: float = 0.2,
                 label_smoothing: float = 0.0, max_time: float | None = None, patience: int = 5,
                 validation_fraction: float = 0.1, device: str = "auto", batch_size: int = 64,
                 workers: int | None = None, random_state: int | None = None, sync_batchnorm: bool = False):
        self.backbone = backbone
        self.arch = arch
        self.image_size = image_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.dropout = dropout
        self.label_smoothing = label_smoothing
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
        return {"lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
                "weight_decay": trial.suggest_float("weight_decay", 1e-3, 0.3, log=True),
                "dropout": trial.suggest_float("dropout", 0.0, 0.5),
                "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2)}

    def _create_backbone(self) -> Backbone:
        return create_backbone(self.backbone, pretrained=False, image_size=self.image_size)

    def _build_network(self, backbone: Backbone, num_classes: int) -> ImageClassifier:
        body = (create_backbone(self.arch, pretrained=False).model if self.arch
                else copy.deepcopy(backbone.model))
        return ImageClassifier(body, num_classes, dropout=self.dropout)

    def _prepare_training(self, network: ImageClassifier, seed: int) -> tuple[list[dict], Callable | None]:
        he_init(network)
        return adamw_groups(network, self.lr, self.weight_decay), None
