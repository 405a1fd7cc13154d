"""What a pixel trainer reads: shuffled, augmented training batches and validation batches.

Small data trains in smaller batches rather than in fewer steps; small validation sets are decoded
once and kept in memory instead of being read again every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from xferkit.core.devices import default_workers
from xferkit.core.distributed import rank, world_size
from xferkit.features.loader import collate_images, image_loader
from xferkit.io.images import UnreadableImage, load_rgb
from xferkit.preprocess import Preprocess, train_transform

#: Optimiser steps an epoch aims for: small data trains in smaller batches, not in fewer steps.
MIN_STEPS = 12
#: Smallest training batch (batch-norm statistics of fewer images are too noisy).
MIN_TRAIN_BATCH = 8
#: Bytes of decoded validation images kept in memory for the whole run (larger sets are re-read).
VALIDATION_IN_MEMORY = 512 * 2**20


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


def training_batch_size(n: int, batch_size: int) -> int:
    """Images per optimiser step for *n* images: *batch_size* at most, fewer for ``MIN_STEPS`` an epoch."""
    return min(batch_size, max(MIN_TRAIN_BATCH, n // MIN_STEPS))


def train_loader(paths: list[Path], preprocess: Preprocess, device: torch.device, batch_size: int,
                 workers: int | None, seed: int) -> DataLoader:
    """Shuffled, augmented batches (see :func:`training_batch_size`); a short last one is dropped.

    Images that fail to decode are left out of their batch. Under torchrun *batch_size* is the
    global batch: each rank reads its share of it from its own shard of a common shuffle (the
    sampler's ``set_epoch`` reshuffles every epoch), so every rank takes as many steps.
    """
    workers = default_workers(device) if workers is None else workers
    batch_size = training_batch_size(len(paths), batch_size)
    dataset, sampler, n = AugmentedImages(paths, train_transform(preprocess)), None, len(paths)
    if world_size() > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
        n, batch_size = len(sampler), max(1, batch_size // world_size())
    return DataLoader(dataset, sampler=sampler, batch_size=min(batch_size, n), shuffle=sampler is None,
                      drop_last=n > batch_size, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed), collate_fn=collate_images,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def validation_batches(paths: list[Path], preprocess: Preprocess, device: torch.device, batch_size: int,
                       workers: int | None) -> Iterable:
    """Validation batches, decoded once and kept when small (no worker start-up and decoding each epoch)."""
    loader = image_loader(paths, preprocess, device, batch_size, workers)
    small = len(paths) * 3 * math.prod(preprocess.input_size) <= VALIDATION_IN_MEMORY
    return list(loader) if small else loader
