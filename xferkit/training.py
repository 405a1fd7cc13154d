"""Train a classifier network on pixels: the loop and base class shared by the image heads.

Augmentation from timm's training defaults, batches small enough for several steps an epoch,
AdamW (fused) with linear warm-up then cosine decay, label smoothing, early stopping on
validation loss in the schedule's second half (best weights restored), a time budget,
channels-last weights, and bf16 autocast on CUDA.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset

from xferkit.backbones import Backbone, Preprocess
from xferkit.devices import default_workers, resolve_device
from xferkit.errors import XferkitError
from xferkit.features import (
    Features,
    Normalizer,
    collate_images,
    extract_features,
    image_loader,
    refuse_skipped,
)
from xferkit.heads.base import Head, check_positive
from xferkit.images import UnreadableImage, load_rgb
from xferkit.progress import console, progress_bar

#: Batches timed in the first epoch before the time-per-epoch estimate is printed.
ESTIMATE_AFTER = 5
#: Optimiser steps an epoch aims for: small data trains in smaller batches, not in fewer steps.
MIN_STEPS = 12
#: Smallest training batch (batch-norm statistics of fewer images are too noisy).
MIN_TRAIN_BATCH = 8
#: Bytes of decoded validation images kept in memory for the whole run (larger sets are re-read).
VALIDATION_IN_MEMORY = 512 * 2**20


class ImageClassifier(nn.Module):
    """``body`` (pooled features) -> dropout -> linear; *frozen* body modules never train.

    Frozen modules keep ``requires_grad=False`` and stay in eval mode even while the rest
    trains, so their batch-norm statistics do not move either.
    """

    def __init__(self, body: nn.Module, num_classes: int, dropout: float = 0.0,
                 frozen: Sequence[str] = ()):
        super().__init__()
        self.body, self.dropout = body.requires_grad_(True), nn.Dropout(dropout)
        self.classifier = nn.Linear(body.num_features, num_classes)
        self.frozen = list(frozen)
        for name in self.frozen:
            body.get_submodule(name).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.body(x)))

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for name in self.frozen:
            self.body.get_submodule(name).eval()
        return self

    def learned_state(self) -> dict[str, torch.Tensor]:
        """The tensors training can change: everything outside the frozen modules."""
        frozen = tuple(f"body.{name}." for name in self.frozen)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}


class AugmentedImages(Dataset):
    """Training items ``(index, uint8 tensor or None, error)``, randomly augmented on every read."""

    def __init__(self, paths: list[Path], transform: Callable):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_rgb(self.paths[i])), ""
        except UnreadableImage as err:
            return i, None, str(err)


#: Random-resized-crop area range: timm's default (0.08, 1) destroys small images such as digits;
#: 0.35 is the milder floor fastai uses for fine-tuning.
CROP_SCALE = (0.35, 1.0)


def train_transform(preprocess: Preprocess) -> Callable:
    """timm's training augmentation (random resized crop, flip, colour jitter) as uint8 tensors."""
    return create_transform((3, *preprocess.input_size), is_training=True, use_prefetcher=True,
                            interpolation=preprocess.interpolation, scale=CROP_SCALE)


def training_batch_size(n: int, batch_size: int) -> int:
    """Images per optimiser step for *n* images: *batch_size* at most, fewer for ``MIN_STEPS`` an epoch."""
    return min(batch_size, max(MIN_TRAIN_BATCH, n // MIN_STEPS))


def train_loader(paths: list[Path], preprocess: Preprocess, device: torch.device, batch_size: int,
                 workers: int | None, seed: int) -> DataLoader:
    """Shuffled, augmented batches (see :func:`training_batch_size`); a short last one is dropped."""
    workers = default_workers(device) if workers is None else workers
    batch_size = training_batch_size(len(paths), batch_size)
    return DataLoader(AugmentedImages(paths, train_transform(preprocess)),
                      batch_size=min(batch_size, len(paths)), shuffle=True,
                      drop_last=len(paths) > batch_size, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed), collate_fn=collate_images,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def validation_batches(paths: list[Path], preprocess: Preprocess, device: torch.device, batch_size: int,
                       workers: int | None) -> Iterable:
    """Validation batches, decoded once and kept when small (no worker start-up and decoding each epoch)."""
    loader = image_loader(paths, preprocess, device, batch_size, workers)
    small = len(paths) * 3 * math.prod(preprocess.input_size) <= VALIDATION_IN_MEMORY
    return list(loader) if small else loader


def readable_images(paths: list[Path], preprocess: Preprocess, device: str = "auto",
                    batch_size: int = 64, workers: int | None = None, strict: bool = False,
                    progress: bool = True) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """Decode every image once: the indices of those that read, and the skipped ``(path, reason)``."""
    failures: dict[int, str] = {}
    loader = image_loader(paths, preprocess, resolve_device(device), batch_size, workers)
    with progress_bar("checking images", len(paths), enabled=progress) as advance:
        for index, _, failed in loader:
            failures.update(failed)
            advance(len(index) + len(failed))
    skipped = [(paths[i], failures[i]) for i in sorted(failures)]
    if strict:
        refuse_skipped(skipped)
    return np.array([i for i in range(len(paths)) if i not in failures], dtype=np.int64), skipped


def param_groups(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups at *lr*: weight decay on weight matrices and kernels, none on biases and norms."""
    params = [p for p in params if p.requires_grad]
    groups = [([p for p in params if p.ndim > 1], weight_decay), ([p for p in params if p.ndim <= 1], 0.0)]
    return [{"params": ps, "lr": lr, "weight_decay": wd} for ps, wd in groups if ps]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at *total_steps*."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
    return factor


def check_fraction(**values: float | None) -> None:
    """Raise a clear error for hyper-parameters that must lie in [0, 1)."""
    for name, value in values.items():
        if value is not None and not 0.0 <= value < 1.0:
            raise XferkitError(f"{name} must be in [0, 1), got {value}.")


@dataclass
class Budget:
    """When training stops and how the loss is smoothed.

    Early stopping looks only at the second half of the cosine schedule: before it, the learning
    rate is still high and validation loss is noisy (a from-scratch network's first epochs, at
    chance, can have the lowest loss), so no epoch there is kept or is a reason to stop.
    """

    epochs: int
    patience: int
    max_time: float | None = None
    label_smoothing: float = 0.0

    @property
    def first_kept_epoch(self) -> int:
        return self.epochs // 2 + 1


def train_classifier(network: ImageClassifier, groups: list[dict], train: DataLoader,
                     labels: torch.Tensor, val: Iterable | None, val_labels: torch.Tensor | None,
                     normalize: Normalizer, budget: Budget, description: str = "training",
                     progress: bool = True,
                     optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None) -> dict:
    """Train *network* in place; with validation data, keep the epoch of lowest validation loss.

    ``optimizer_step`` replaces ``optimizer.step()`` (random freeze masks gradients there).
    Returns the history as a JSON-able dict.
    """
    device, step_optimizer = normalize.device, optimizer_step or (lambda opt: opt.step())
    optimizer = torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"))
    total = budget.epochs * len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, max(1, min(len(train), total // 10))))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=budget.label_smoothing)
    history = {"train_loss": [], "val_loss": [], "val_accuracy": [], "stopped": "epochs"}
    best_loss, best_state, best_epoch = math.inf, None, 0
    start = time.perf_counter()
    with progress_bar(description, total, unit="batch", enabled=progress) as advance:
        for epoch in range(1, budget.epochs + 1):
            network.train()
            losses = []
            for step, (index, images, _) in enumerate(train):
                if budget.max_time is not None and time.perf_counter() - start > budget.max_time:
                    history["stopped"] = "max_time"
                    break
                if not len(index):
                    continue
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = loss_fn(network(normalize(images)).float(), labels[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                step_optimizer(optimizer)
                schedule.step()
                losses.append(loss.item())
                advance(info=f"epoch {epoch}/{budget.epochs} loss {loss.item():.3f}")
                if epoch == 1 and step + 1 == min(ESTIMATE_AFTER, len(train)) and progress:
                    per_epoch = (time.perf_counter() - start) / (step + 1) * len(train)
                    console.print(f"{description}: about {per_epoch:.1f}s per epoch ({len(train)} "
                                  f"batches), {per_epoch * budget.epochs:.0f}s for {budget.epochs} epochs "
                                  "at most", highlight=False)
            history["train_loss"].append(float(np.mean(losses)) if losses else None)
            if val is not None:
                val_loss, val_acc = validate(network, val, val_labels, normalize)
                history["val_loss"].append(val_loss)
                history["val_accuracy"].append(val_acc)
                advance(0, info=f"epoch {epoch}/{budget.epochs} val_loss {val_loss:.3f} "
                               f"val_acc {val_acc:.3f}")
                kept = epoch >= budget.first_kept_epoch
                if kept and val_loss < best_loss:
                    best_loss, best_epoch = val_loss, epoch
                    best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
                elif kept and epoch - best_epoch >= budget.patience:
                    history["stopped"] = "patience"
            if history["stopped"] != "epochs":
                break
    if best_state is not None:
        network.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    history.update(epochs_run=epoch, best_epoch=best_epoch or epoch, batch_size=train.batch_size,
                   seconds=round(seconds, 3), seconds_per_epoch=round(seconds / epoch, 3))
    return history


@torch.no_grad()
def validate(network: nn.Module, loader: Iterable, labels: torch.Tensor, normalize: Normalizer
             ) -> tuple[float, float]:
    """Mean negative log-likelihood (no smoothing) and accuracy on the evaluation transform."""
    network.eval()
    device, nll, correct, n = normalize.device, 0.0, 0, 0
    for index, images, _ in loader:
        if not len(index):
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = network(normalize(images)).float()
        target = labels[index].to(device)
        nll += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
        n += len(index)
    return nll / max(n, 1), correct / max(n, 1)


def to_device(network: nn.Module, device: torch.device) -> nn.Module:
    """Move *network* to *device*, channels-last like its inputs (cuDNN with bf16 and oneDNN prefer it)."""
    return network.to(device).to(memory_format=torch.channels_last)


class ImageHead(Head):
    """A head that trains a network on image pixels (``X`` are image paths, not features).

    The network comes from a backbone the head cannot pick itself: call :meth:`attach` with
    it before ``fit`` and after ``Head.load`` (``repurpose`` and ``TransferModel.load`` do).
    """

    input_kind = "images"
    #: False where the backbone's pretrained weights are never used (the pipeline skips loading them).
    pretrained_weights: ClassVar[bool] = True

    def attach(self, backbone: Backbone, device: str = "auto", batch_size: int = 64,
               workers: int | None = None, progress: bool = True) -> ImageHead:
        """Set the backbone to train from (and where to run); rebuilds a loaded head's network."""
        self.backbone_ = backbone
        self.run_options_ = {"device": device, "batch_size": batch_size, "workers": workers,
                             "progress": progress}
        if hasattr(self, "_loaded_state"):
            network = self._build_network(backbone, len(self.classes_))
            unexpected = set(self._loaded_state) - set(network.state_dict())
            if unexpected:
                raise XferkitError(f"the saved {self.name} head does not fit backbone {backbone.name} "
                                   f"(unknown tensors {', '.join(sorted(unexpected)[:5])}).")
            network.load_state_dict(self._loaded_state, strict=False)
            self.network_ = network.eval()
        return self

    # --- what each image head defines ------------------------------------------------------
    def _check_params(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _build_network(self, backbone: Backbone, num_classes: int) -> ImageClassifier:  # pragma: no cover
        """The network, frozen where it should be; weights are set by ``_prepare_training`` or a load."""
        raise NotImplementedError

    def _prepare_training(self, network: ImageClassifier
                          ) -> tuple[list[dict], Callable | None]:  # pragma: no cover - interface
        """Initialise what trains (seeded); AdamW groups and an optional optimiser-step function."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------
    def fit(self, X, y, X_val=None, y_val=None) -> ImageHead:
        check_positive(lr=self.lr, epochs=self.epochs, patience=self.patience, max_time=self.max_time)
        check_fraction(label_smoothing=self.label_smoothing)
        if self.weight_decay < 0:
            raise XferkitError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        self._check_params()
        if not hasattr(self, "backbone_"):
            raise XferkitError(f"the {self.name} head trains on pixels: call attach(backbone) "
                               "before fit (xferkit repurpose does this).")
        paths, y = [Path(p) for p in X], np.asarray(y)
        self.classes_ = np.unique(y)
        options, preprocess = self.run_options_, self.backbone_.preprocess
        device = resolve_device(options["device"])
        network = to_device(self._build_network(self.backbone_, len(self.classes_)), device)
        torch.manual_seed(self.seed)
        random.seed(self.seed)  # timm's random-resized crop draws from Python's generator
        groups, optimizer_step = self._prepare_training(network)
        train = train_loader(paths, preprocess, device, options["batch_size"], options["workers"],
                             self.seed)
        val = val_labels = None
        if X_val is not None and len(X_val):
            val = validation_batches([Path(p) for p in X_val], preprocess, device, options["batch_size"],
                                     options["workers"])
            val_labels = self._encode(y_val)
        budget = Budget(self.epochs, self.patience, self.max_time, self.label_smoothing)
        self.history_ = train_classifier(network, groups, train, self._encode(y), val, val_labels,
                                         Normalizer(preprocess, device), budget, f"training {self.name}",
                                         options["progress"], optimizer_step)
        self.network_ = network.cpu().eval()
        return self

    def _encode(self, y) -> torch.Tensor:
        return torch.as_tensor(np.searchsorted(self.classes_, np.asarray(y)), dtype=torch.long)

    def predict_images(self, paths: list[Path], **extract_options) -> tuple[np.ndarray, Features]:
        """Probabilities of the images that decode; takes ``extract_features``' options (never cached).

        ``Features.features`` are the trained network's pooled features.
        """
        if not hasattr(self, "network_"):
            raise XferkitError(f"the {self.name} head has no network yet: fit it, or attach the backbone "
                               "after loading.")
        extractor = replace(self.backbone_, model=self.network_.body)
        feats = extract_features(extractor, paths, **{**extract_options, "cache_dir": False})
        with torch.no_grad():
            logits = self.network_.classifier(torch.from_numpy(feats.features))
        return torch.softmax(logits, dim=1).numpy(), feats

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities for image paths; an unreadable file is an error here (use ``predict_images``)."""
        options = {**getattr(self, "run_options_", {}), "progress": False}
        return self.predict_images([Path(p) for p in X], strict=True, **options)[0]

    def _get_state(self) -> dict[str, torch.Tensor]:
        return self.network_.learned_state()

    def _set_state(self, state: dict[str, torch.Tensor], info: dict) -> None:
        self._loaded_state, self.history_ = state, info["history"]

    def _get_info(self) -> dict:
        return {"history": self.history_}
