"""Fine-tuning: a new classifier trained together with the last blocks of the pretrained backbone."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from xferkit.backbones import Backbone, IntermediateLayer
from xferkit.errors import XferkitError
from xferkit.heads.base import check_positive
from xferkit.training import ImageClassifier, ImageHead, check_fraction, param_groups


class FinetuneHead(ImageHead):
    """Train the last ``unfreeze`` backbone blocks and a new linear classifier on augmented pixels.

    ``unfreeze``: "0" trains only the classifier (on live features), an integer K the last K
    blocks (see :func:`backbone_blocks`), "all" everything (the default: the most accurate, and
    the slowest; "1" trains a fraction of the work). The backbone trains at
    ``lr * backbone_lr_mult``. ``random_freeze=P`` additionally keeps a random fraction P of each
    trained backbone tensor fixed (xfer's random-freeze). Only what can change is saved.
    """

    name = "finetune"

    def __init__(self, unfreeze: str = "all", lr: float = 3e-3, backbone_lr_mult: float = 0.3,
                 weight_decay: float = 0.01, epochs: int = 10, label_smoothing: float = 0.0,
                 random_freeze: float | None = None, max_time: float | None = None, patience: int = 3,
                 seed: int = 0):
        self.unfreeze = unfreeze
        self.lr = lr
        self.backbone_lr_mult = backbone_lr_mult
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.label_smoothing = label_smoothing
        self.random_freeze = random_freeze
        self.max_time = max_time
        self.patience = patience
        self.seed = seed

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
                "unfreeze": trial.suggest_categorical("unfreeze", ["0", "1", "2", "all"]),
                "backbone_lr_mult": trial.suggest_float("backbone_lr_mult", 0.01, 1.0, log=True),
                "weight_decay": trial.suggest_float("weight_decay", 1e-4, 0.1, log=True),
                "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2)}

    def _check_params(self) -> None:
        check_positive(backbone_lr_mult=self.backbone_lr_mult)
        check_fraction(random_freeze=self.random_freeze)

    def _build_network(self, backbone: Backbone, num_classes: int) -> ImageClassifier:
        body = copy.deepcopy(backbone.model)
        blocks = backbone_blocks(body)
        trained = unfrozen_count(self.unfreeze, blocks, backbone.name)
        frozen = [name for block in blocks[:len(blocks) - trained] for name in block]
        return ImageClassifier(body, num_classes, frozen=frozen)

    def _prepare_training(self, network: ImageClassifier) -> tuple[list[dict], Callable | None]:
        network.classifier.reset_parameters()
        backbone = [p for p in network.body.parameters() if p.requires_grad]
        groups = (param_groups(network.classifier.parameters(), self.lr, self.weight_decay)
                  + param_groups(backbone, self.lr * self.backbone_lr_mult, self.weight_decay))
        if not self.random_freeze:
            return groups, None
        return groups, RandomFreeze(backbone, self.random_freeze, self.seed).step


def backbone_blocks(model: nn.Module) -> list[list[str]]:
    """The backbone's blocks in forward order, each a list of module names: the unit of ``unfreeze``.

    timm models: one block per stage in ``feature_info`` (the modules up to and including that
    stage's output; the pooling after the last stage joins it). Other models (torchvision):
    one block per top-level child with parameters, ``features`` counted child by child.
    """
    inner, prefix = (model.model, "model.") if isinstance(model, IntermediateLayer) else (model, "")
    ends = [info["module"] for info in getattr(inner, "feature_info", None) or []]
    units = []
    for name, child in inner.named_children():
        nested = any(end.startswith(name + ".") for end in ends) or (not ends and name == "features")
        units += [f"{name}.{sub}" for sub, _ in child.named_children()] if nested else [name]

    def ends_block(unit: str) -> bool:
        return unit in ends if ends else any(True for _ in inner.get_submodule(unit).parameters())

    blocks, current = [], []
    for unit in units:
        current.append(unit)
        if ends_block(unit):
            blocks.append(current)
            current = []
    if current:
        blocks[-1:] = [(blocks[-1] if blocks else []) + current]
    return [[prefix + unit for unit in block] for block in blocks]


def unfrozen_count(unfreeze: str | int, blocks: list[list[str]], backbone: str) -> int:
    """How many of the last *blocks* train: an integer K, or "all"."""
    text = str(unfreeze).strip().lower()
    if text == "all":
        return len(blocks)
    if not text.isdigit():
        raise XferkitError(f"--unfreeze must be a number of blocks or 'all', got {unfreeze!r}.")
    if int(text) > len(blocks):
        names = ", ".join(block[-1] for block in blocks)
        raise XferkitError(f"--unfreeze {text} is more than the {len(blocks)} blocks of {backbone} "
                           f"({names}); use at most {len(blocks)}, or 'all'.")
    return int(text)


class RandomFreeze:
    """xfer's random freeze: a fixed random fraction of each trained tensor never changes.

    The frozen entries' gradients are masked to zero; since AdamW's decoupled weight decay
    bypasses gradients, their values are also written back after each step.
    """

    def __init__(self, params: list[nn.Parameter], fraction: float, seed: int):
        generator = torch.Generator().manual_seed(seed)
        masks = [(torch.rand(p.shape, generator=generator) < fraction).to(p.device) for p in params]
        self.frozen = [(p, mask, p.detach()[mask].clone()) for p, mask in zip(params, masks, strict=True)]

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        for p, mask, _ in self.frozen:
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0.0)
        optimizer.step()
        with torch.no_grad():
            for p, mask, values in self.frozen:
                p[mask] = values
