"""Datasets and loaders that decode images in worker processes; a bad file is a failure item, not a raise."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from xferkit.core.devices import default_workers
from xferkit.io.images import UnreadableImage, read_jpeg
from xferkit.io.jpeg_cpu import dct_scale
from xferkit.io.jpeg_device import JpegBatch
from xferkit.preprocess import MAX_TENSOR_ASPECT, Preprocess, image_to_tensor

#: Images a worker hands over at a time when several share a batch: decoded ones, or
#: undecoded JPEGs (cheap to read, and the GPU decoder is faster on larger batches).
CHUNK = {False: 32, True: 64}


class ImageTensors(Dataset):
    """Items are ``(index, uint8 tensor or None, error message)``: bad files never raise here."""

    def __init__(self, paths: list[Path], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.decode(i)

    def decode(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, image_to_tensor(self.paths[i], self.preprocess), ""
        except UnreadableImage as err:
            return i, None, str(err).removeprefix(f"{self.paths[i]}: ")


class ExtractionItems(ImageTensors):
    """Like :class:`ImageTensors`, but plain JPEGs for the device come back undecoded.

    *jpegs* says which: "cpu" none, "device" or "dali" all, "mixed" those the workers would decode
    at full size (the device decoder decodes every pixel; the workers scale large ones down).
    """

    def __init__(self, paths: list[Path], preprocess: Preprocess, jpegs: str):
        super().__init__(paths, preprocess)
        self.jpegs = jpegs

    def __getitem__(self, i: int):
        jpeg = read_jpeg(self.paths[i]) if self.jpegs != "cpu" else None
        if jpeg is not None and max(jpeg.size) > MAX_TENSOR_ASPECT * min(jpeg.size):
            jpeg = None  # resized whole on the device, a long strip would take gigabytes: the CPU crops first
        if (jpeg is not None and self.jpegs == "mixed"
                and dct_scale(jpeg.size, self.preprocess.resize_size) < 1):
            jpeg = None  # the workers decode it at reduced size, the device would decode every pixel
        return (i, None, "", jpeg) if jpeg is not None else (*self.decode(i), None)


@dataclass
class Chunk:
    """A few consecutive items: decoded images, JPEGs left for the device, failures (by input index)."""

    index: torch.Tensor
    images: torch.Tensor
    failed: list[tuple[int, str]]
    jpeg_index: list[int]
    jpegs: JpegBatch

    def pin_memory(self) -> Chunk:
        """Pin what is copied to the GPU (JPEG bytes are read by the decoder on the host)."""
        self.images = self.images.pin_memory()
        return self


def collate_images(items):
    """Stack the images that decoded; pass the failures along as (index, message)."""
    ok = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, msg) for i, t, msg in items if t is None]
    images = torch.stack([t for _, t in ok]) if ok else torch.empty(0, dtype=torch.uint8)
    return torch.tensor([i for i, _ in ok], dtype=torch.long), images, failed


def collate_chunk(items) -> Chunk:
    """A :class:`Chunk` of ``ExtractionItems``: decoded images stacked, JPEG bytes joined."""
    index, images, failed = collate_images([item[:3] for item in items if item[3] is None])
    jpegs = [(item[0], item[3]) for item in items if item[3] is not None]
    return Chunk(index, images, failed, [i for i, _ in jpegs], JpegBatch.of([j for _, j in jpegs]))


def _feeding_worker_init(worker_id: int) -> None:
    """Workers that decode for a GPU yield to the main process, which feeds it."""
    os.nice(5)


def image_loader(paths: list[Path], preprocess: Preprocess, device: torch.device,
                 batch_size: int, workers: int | None) -> DataLoader:
    """Batches of ``(index, uint8 images, failures)`` decoded by *workers* processes."""
    workers = default_workers(device) if workers is None else workers
    return DataLoader(ImageTensors(paths, preprocess), batch_size=batch_size, num_workers=workers,
                      collate_fn=collate_images, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if workers else None)


def chunk_loader(paths: list[Path], preprocess: Preprocess, device: torch.device, batch_size: int,
                 workers: int, jpegs: str) -> DataLoader:
    """:class:`Chunk` s from *workers* processes; with several, small chunks keep all of them busy.

    *jpegs*: which plain JPEGs are left to the device (see :class:`ExtractionItems`).
    """
    chunk = min(batch_size, CHUNK[jpegs != "cpu"], math.ceil(len(paths) / max(workers, 1)))
    chunk = batch_size if workers <= 1 else chunk
    cuda = device.type == "cuda"
    return DataLoader(ExtractionItems(paths, preprocess, jpegs), batch_size=chunk,
                      num_workers=workers, collate_fn=collate_chunk, pin_memory=cuda,
                      worker_init_fn=_feeding_worker_init if workers and cuda else None,
                      prefetch_factor=4 if workers else None)
