"""Push images through a backbone once, in batches, and keep the features (cached on disk).

Extraction runs as fast as the backbone allows: JPEGs decode at reduced size (draft mode) in
worker processes budgeted against the cores torch computes on; uint8 images travel to the device
through pinned memory and are normalised there; on CUDA the backbone runs in bf16 channels-last
and each batch's features come back while the next batch computes.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from xferkit import gpu_decode
from xferkit.backbones import Backbone, Preprocess
from xferkit.cache import FeatureCache, default_cache_dir, file_key
from xferkit.devices import default_workers, feeding_threads, resolve_device
from xferkit.errors import XferkitError
from xferkit.gpu_decode import JpegBatch
from xferkit.images import UnreadableImage, load_rgb, read_jpeg
from xferkit.progress import progress_bar

#: Images a worker hands over at a time when several share a batch: decoded ones, or
#: undecoded JPEGs (cheap to read, and the GPU decoder is faster on larger batches).
CHUNK = {False: 32, True: 64}
#: Where plain JPEGs are decoded (see ``extract_features``).
DECODE_CHOICES = ("auto", "workers", "device")


@dataclass
class Features:
    """Features of the images that decoded; ``kept`` indexes the input paths they belong to."""

    features: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[Path, str]]


def image_to_tensor(path: Path, preprocess: Preprocess) -> torch.Tensor:
    """Decode, resize the shorter side, centre-crop: a uint8 (3, H, W) tensor, not yet normalised."""
    img = load_rgb(path, min_size=preprocess.resize_size)
    img = TF.resize(img, preprocess.resize_size,
                    interpolation=InterpolationMode(preprocess.interpolation), antialias=True)
    img = TF.center_crop(img, list(preprocess.input_size))
    return TF.pil_to_tensor(img)


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
    """Like :class:`ImageTensors`, but with ``device_jpegs`` plain JPEGs come back undecoded."""

    def __init__(self, paths: list[Path], preprocess: Preprocess, device_jpegs: bool):
        super().__init__(paths, preprocess)
        self.device_jpegs = device_jpegs

    def __getitem__(self, i: int):
        jpeg = read_jpeg(self.paths[i]) if self.device_jpegs else None
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


class Normalizer:
    """uint8 batches to normalised float on the device (moving uint8 is 4x less traffic)."""

    def __init__(self, preprocess: Preprocess, device: torch.device):
        std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        return (x * self.scale - self.shift).contiguous(memory_format=torch.channels_last)


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
                 workers: int, device_jpegs: bool) -> DataLoader:
    """:class:`Chunk` s from *workers* processes; with several, small chunks keep all of them busy."""
    chunk = min(batch_size, CHUNK[device_jpegs], math.ceil(len(paths) / max(workers, 1)))
    chunk = batch_size if workers <= 1 else chunk
    cuda = device.type == "cuda"
    return DataLoader(ExtractionItems(paths, preprocess, device_jpegs), batch_size=chunk,
                      num_workers=workers, collate_fn=collate_chunk, pin_memory=cuda,
                      worker_init_fn=_feeding_worker_init if workers and cuda else None,
                      prefetch_factor=4 if workers else None)


def inference_model(backbone: Backbone, device: torch.device) -> nn.Module:
    """The backbone on *device*, channels-last (oneDNN on CPUs and cuDNN with bf16 both prefer it)."""
    return backbone.model.to(device).to(memory_format=torch.channels_last)


@contextmanager
def inference_context(device: torch.device):
    """No autograd; bf16 autocast on CUDA (CPU stays float32, so its features are exact)."""
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=device.type == "cuda"):
        yield


def extract_features(backbone: Backbone, paths: list[Path], device: str = "auto",
                     batch_size: int = 64, workers: int | None = None,
                     cache_dir: Path | None | bool = None, strict: bool = False,
                     progress: bool = True, decode: str = "auto") -> Features:
    """Features for *paths* (rows in input order, skipped files left out and listed).

    ``cache_dir=None`` uses the default cache, ``False`` disables it. ``strict`` turns the
    first unreadable file into an error instead of a counted skip. ``decode`` says where
    plain JPEGs are decoded: ``"workers"`` (PIL, in draft mode, in the worker processes),
    ``"device"`` (torchvision on the extraction device: nvJPEG on a GPU) or ``"auto"`` (the
    device when it is a GPU with nvJPEG, else the workers); other files always use the workers.
    """
    paths = [Path(p) for p in paths]
    cache = None
    if cache_dir is not False:
        cache = FeatureCache(cache_dir or default_cache_dir(), _extractor_key(backbone))
    keys = [file_key(p) for p in paths] if cache else []
    found, failed = cache.lookup(keys) if cache else ({}, {})
    todo = np.array([i for i in range(len(paths)) if i not in found and i not in failed], dtype=np.int64)

    out = np.zeros((len(paths), backbone.num_features), dtype=np.float32)
    for i, row in found.items():
        out[i] = row
    if len(todo):
        computed, done, new_failures = _run_backbone(backbone, [paths[i] for i in todo], device,
                                                     batch_size, workers, progress, decode)
        out[todo[done]] = computed[done]
        new_failures = {int(todo[j]): msg for j, msg in new_failures.items()}
        if cache:
            cache.store([keys[i] for i in todo[done]], computed[done],
                        {keys[i]: msg for i, msg in new_failures.items()})
        failed.update(new_failures)
    skipped = [(paths[i], failed[i]) for i in sorted(failed)]
    if strict:
        refuse_skipped(skipped)
    kept = np.array([i for i in range(len(paths)) if i not in failed], dtype=np.int64)
    return Features(out[kept], kept, skipped)


def _run_backbone(backbone: Backbone, paths: list[Path], device: str, batch_size: int,
                  workers: int | None, progress: bool, decode: str
                  ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Rows for *paths*, the indices that decoded, and the failures (index -> message)."""
    dev = resolve_device(device)
    device_jpegs = _decode_on_device(decode, dev, backbone.preprocess)
    model = inference_model(backbone, dev)
    rows = np.zeros((len(paths), backbone.num_features), dtype=np.float32)
    done, failures = np.zeros(len(paths), dtype=bool), {}
    workers = default_workers(dev) if workers is None else workers
    loader = chunk_loader(paths, backbone.preprocess, dev, batch_size, workers, device_jpegs)
    normalize, pending = Normalizer(backbone.preprocess, dev), None
    with (progress_bar(f"extracting {backbone.name}", len(paths), enabled=progress) as advance,
          feeding_threads(dev, workers), inference_context(dev)):
        for index, images in _batches(loader, normalize, batch_size, failures, advance):
            feats = _to_host(model(images))
            if pending is not None:
                _store(*pending, rows, done, advance)
            pending = (index, *feats)
        if pending is not None:
            _store(*pending, rows, done, advance)
    backbone.model.to("cpu")
    return rows, np.flatnonzero(done), failures


def _decode_on_device(decode: str, device: torch.device, preprocess: Preprocess) -> bool:
    if decode not in DECODE_CHOICES:
        raise XferkitError(f"unknown decode {decode!r}; use one of {', '.join(DECODE_CHOICES)}.")
    if decode == "workers" or decode == "auto" and device.type != "cuda":
        return False
    works = gpu_decode.supports(preprocess) and gpu_decode.gpu_decode_available(device)
    if decode == "device" and not works:
        raise XferkitError(f"JPEGs cannot be decoded on {device} here (torchvision without nvJPEG, or "
                           f"a {preprocess.interpolation} resize); use decode='workers'.")
    return works


def _batches(loader: DataLoader, normalize: Normalizer, batch_size: int, failures: dict, advance):
    """Normalised device batches of up to *batch_size* images, joined from the loader's chunks."""
    index, images = [], []
    for chunk in loader:
        known = len(failures)
        failures.update(chunk.failed)
        for part_index, part in _chunk_parts(chunk, loader.dataset, normalize.device, failures):
            index.append(part_index)
            images.append(normalize(part))
        advance(len(failures) - known)
        if sum(map(len, index)) >= batch_size:
            yield torch.cat(index), torch.cat(images)
            index, images = [], []
    if index:
        yield torch.cat(index), torch.cat(images)


def _chunk_parts(chunk: Chunk, dataset: ExtractionItems, device: torch.device, failures: dict):
    """(index, images) of a chunk: those the workers decoded, then its JPEGs decoded on *device*."""
    if len(chunk.index):
        yield chunk.index, chunk.images
    if not len(chunk.jpegs):
        return
    images, ok = gpu_decode.decode_resized(chunk.jpegs, dataset.preprocess, device)
    if ok:
        yield torch.tensor([chunk.jpeg_index[k] for k in ok]), images
    for k in sorted(set(range(len(chunk.jpegs))) - set(ok)):  # rejected by the device decoder
        i, image, message = dataset.decode(chunk.jpeg_index[k])
        if image is None:
            failures[i] = message
        else:
            yield torch.tensor([i]), image[None]


def _to_host(feats: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying *feats* to the host; on CUDA the copy overlaps the next batch."""
    feats = feats.float()
    if not feats.is_cuda:
        return feats, None
    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _store(index: torch.Tensor, host: torch.Tensor, event: torch.cuda.Event | None,
           rows: np.ndarray, done: np.ndarray, advance) -> None:
    if event is not None:
        event.synchronize()
    rows[index.numpy()] = host.numpy()
    done[index.numpy()] = True
    advance(len(index))


def _extractor_key(backbone: Backbone) -> dict:
    return {"name": backbone.name, "digest": backbone.weights_digest, "layer": backbone.layer,
            "preprocess": backbone.preprocess.to_json()}


def refuse_skipped(skipped: list[tuple[Path, str]]) -> None:
    """``--strict``: the first unreadable file becomes an error instead of a counted skip."""
    if skipped:
        path, msg = skipped[0]
        raise XferkitError(f"cannot read {path}: {msg} ({len(skipped)} unreadable file(s) in all; "
                           "remove them, or drop --strict to skip them).")
