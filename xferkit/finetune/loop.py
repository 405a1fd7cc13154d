"""The training loop shared by the pixel trainers, and when it stops.

AdamW (fused) with timm's linear warm-up then cosine decay, stepped every update; label
smoothing; early stopping on validation loss in the schedule's second half (best weights
restored); a time budget; bf16 autocast on CUDA. Under torchrun the network trains data-parallel
(DistributedDataParallel: each rank's share of the global batch, gradients averaged in backward),
validation sums are all-reduced, and rank 0's stopping decision and the time budget hold for all ranks;
batch norm optionally takes its statistics over the global batch (SyncBatchNorm, on GPUs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from xferkit.core.distributed import all_reduce_sum, broadcast_object, init, world_size
from xferkit.core.errors import InvalidParameter
from xferkit.core.reporting import ProgressCallback
from xferkit.finetune.network import ImageClassifier
from xferkit.preprocess import Normalizer

#: Batches timed in the first epoch before the time per epoch is estimated.
ESTIMATE_AFTER = 5
#: ``epoch_end(epoch, val_nll) -> stop``: told each epoch's validation NLL; True stops training.
EpochEnd = Callable[[int, float], bool]


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


def adamw_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups of *module*'s trainable parameters at *lr*: no weight decay on biases and norms."""
    return [{**group, "lr": lr} for group in param_groups_weight_decay(module, weight_decay)]


def train_classifier(network: ImageClassifier, groups: list[dict], train: DataLoader, labels: torch.Tensor,
                     val: Iterable | None, val_labels: torch.Tensor | None, normalize: Normalizer,
                     budget: Budget, progress: ProgressCallback | None = None,
                     optimizer_step: Callable[[torch.optim.Optimizer], None] | None = None,
                     epoch_end: EpochEnd | None = None, sync_batchnorm: bool = False) -> dict:
    """Train *network* in place; with validation data, keep the epoch of lowest validation loss.

    ``progress(done, total, info)`` hears of every step (in batches); ``optimizer_step`` replaces
    ``optimizer.step()`` (random freeze masks gradients there); ``epoch_end(epoch, val_loss)`` hears
    every validated epoch and stops training by returning True (tuning prunes a poor trial so).
    ``sync_batchnorm``: under torchrun, batch norm normalises with the statistics of the global batch.
    Returns the history as a JSON-able dict.
    """
    device = normalize.device
    optimizer = torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"))
    model = network
    if init():  # under torchrun: gradients averaged over the ranks' batches during backward
        if sync_batchnorm:
            synchronise_batchnorm(network, device)
        model = DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)
    step = optimizer_step or (lambda opt: opt.step())
    total = budget.epochs * len(train)
    warmup = max(1, min(len(train), total // 10))
    # the cosine reaches 0 one update after the last, so that the last one still learns
    schedule = CosineLRScheduler(optimizer, t_initial=total + 1, warmup_t=warmup, t_in_epochs=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=budget.label_smoothing)
    report = progress or (lambda done, total, info: None)
    history = {"train_loss": [], "val_loss": [], "val_accuracy": [], "stopped": "epochs"}
    best_loss, best_state, best_epoch = math.inf, None, 0
    start, done, pace = time.perf_counter(), 0, ""
    for epoch in range(1, budget.epochs + 1):
        network.train()
        losses = []
        if isinstance(train.sampler, DistributedSampler):
            train.sampler.set_epoch(epoch)  # a new common shuffle each epoch
        for batch, (index, images, _) in enumerate(train):
            if budget.max_time is not None and _out_of_time(start, budget.max_time):
                history["stopped"] = "max_time"
                break
            done = (epoch - 1) * len(train) + batch + 1
            if not len(index):
                continue
            schedule.step_update(done)  # this update's learning rate: linear warm-up, then cosine
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(normalize(images)).float(), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step(optimizer)
            losses.append(loss.item())
            if done == min(ESTIMATE_AFTER, len(train)):
                pace = f" ~{(time.perf_counter() - start) / done * len(train):.1f}s/epoch"
            report(done, total, f"epoch {epoch}/{budget.epochs} loss {losses[-1]:.3f}{pace}")
        history["train_loss"].append(float(np.mean(losses)) if losses else None)
        if val is not None:
            val_loss, val_acc = validate(network, val, val_labels, normalize)
            history["val_loss"].append(val_loss)
            history["val_accuracy"].append(val_acc)
            report(done, total, f"epoch {epoch}/{budget.epochs} val_loss {val_loss:.3f} val_acc {val_acc:.3f}"
                   + pace)
            kept = epoch >= budget.first_kept_epoch
            if kept and val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in network.learned_state().items()}
            elif kept and epoch - best_epoch >= budget.patience:
                history["stopped"] = "patience"
            if epoch_end is not None and epoch_end(epoch, val_loss):
                history["stopped"] = "epoch_end"
        history["stopped"] = broadcast_object(history["stopped"])  # rank 0 decides for every rank
        if history["stopped"] != "epochs":
            break
    if best_state is not None:
        network.load_state_dict(best_state, strict=False)
    seconds = time.perf_counter() - start
    history.update(epochs_run=epoch, best_epoch=best_epoch or epoch,
                   batch_size=train.batch_size * world_size(),  # the global batch
                   seconds=round(seconds, 3), seconds_per_epoch=round(seconds / epoch, 3))
    return history


def synchronise_batchnorm(network: nn.Module, device: torch.device) -> None:
    """Batch norm layers to SyncBatchNorm, in place: the same parameters, so the optimiser still holds them.

    torch's SyncBatchNorm runs on GPUs only (on the CPU it raises in its first training step), so a
    CPU run is refused here, before any step. In eval mode it is plain batch norm.
    """
    if device.type != "cuda":
        raise InvalidParameter("sync_batchnorm=True needs GPUs: torch's SyncBatchNorm does not run on the "
                               "CPU (gloo). Train without it there: each rank's batch norm then uses its "
                               "own share of the batch (keep that at 16 images or more).")
    nn.SyncBatchNorm.convert_sync_batchnorm(network)


@torch.no_grad()
def validate(network: nn.Module, loader: Iterable, labels: torch.Tensor, normalize: Normalizer
             ) -> tuple[float, float]:
    """Mean negative log-likelihood (no smoothing) and accuracy on the evaluation transform.

    Under torchrun *loader* holds this rank's share of the validation images; the sums are all-reduced.
    """
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
    nll, correct, n = all_reduce_sum(torch.tensor([nll, correct, n], dtype=torch.float64)).tolist()
    return nll / max(n, 1), correct / max(n, 1)


def _out_of_time(start: float, max_time: float) -> bool:
    """Whether *max_time* seconds have passed, on any rank (so that every rank stops at the same step)."""
    return bool(all_reduce_sum(torch.tensor([float(time.perf_counter() - start > max_time)])).item())
