"""Push images through a backbone once, in batches, and keep the features (cached on disk by content).

Extraction runs as fast as the backbone allows: JPEGs decode at reduced size (DCT scaling) in
worker processes budgeted against the cores torch computes on, or on the GPU (DALI's hardware
decoder, decoding the next batch while the backbone runs this one, or torchvision's nvJPEG); uint8
images travel to the device through pinned memory and are normalised there; on CUDA the
backbone runs in bf16 channels-last and each batch's features come back while the next batch
computes. Completed rows reach the cache every ``STORE_EVERY`` images, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from xferkit.backbones import Backbone
from xferkit.core.devices import default_workers, resolve_device
from xferkit.core.distributed import all_gather_objects, init, shard
from xferkit.core.errors import XferkitError
from xferkit.core.reporting import SILENT, Reporter
from xferkit.core.threads import thread_budget, workers_to_spare
from xferkit.features.cache import FeatureCache, content_keys, default_cache_dir
from xferkit.features.loader import Chunk, ExtractionItems, chunk_loader
from xferkit.io.jpeg_dali import DaliDecoder, dali_available, dali_supports
from xferkit.io.jpeg_device import decode_oriented, gpu_decode_available
from xferkit.preprocess import Normalizer, Preprocess, resize_decoded, supports_tensor_resize

#: Where plain JPEGs are decoded (see ``extract_features``).
DECODE_CHOICES = ("auto", "workers", "device", "dali")
#: Rows written to the cache at a time during an extraction (what an interruption can lose at most).
STORE_EVERY = 512


@dataclass
class Features:
    """Features of the images that decoded; ``kept`` indexes the input paths they belong to."""

    features: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[Path, str]]
    #: How many of the rows came from the cache rather than the backbone.
    from_cache: int = 0


def extract_features(backbone: Backbone, paths: list[Path], *, device: str = "auto", batch_size: int = 64,
                     workers: int | None = None, cache: bool | str | Path = True, strict: bool = False,
                     decode: str = "auto", gather: bool = True, reporter: Reporter = SILENT) -> Features:
    """Features for *paths* (rows in input order, skipped files left out and listed).

    ``cache``: ``True`` uses the default cache folder, a path another one, ``False`` none.
    ``strict`` turns the first unreadable file into an error instead of a counted skip.
    ``decode`` says where plain JPEGs are decoded: ``"workers"`` (libjpeg-turbo through simplejpeg, in the
    worker processes), ``"device"`` (torchvision on the extraction device: nvJPEG on a GPU), ``"dali"``
    (NVIDIA DALI: the GPU's hardware JPEG decoder, or libjpeg-turbo on a CPU) or ``"auto"`` (on a
    GPU DALI where installed, else nvJPEG for the JPEGs the workers would decode at full size and
    the workers for those they decode at reduced size, else the workers; on a CPU the workers);
    other files always use the workers.
    Under torchrun each rank extracts (and caches) its own contiguous shard of *paths*, and every
    rank gets all the features; ``gather=False``: only its own shard's rows (``kept`` still indexing
    *paths*), with every rank's skipped files.
    """
    paths = [Path(p) for p in paths]
    sharded = init()  # under torchrun: joined first, so that "cuda" means this rank's GPU
    here = shard(len(paths))
    feats = _extract(backbone, paths[here.start:here.stop], device, batch_size, workers, cache, decode,
                     reporter)
    if sharded:
        feats = _gathered(feats, here.start) if gather else _own_rows(feats, here.start)
    if strict:
        refuse_skipped(feats.skipped)
    return feats


def _gathered(local: Features, start: int) -> Features:
    """Every rank's features in input order (the shards are contiguous, so rank order is input order)."""
    parts = all_gather_objects((local.features, local.kept + start, local.skipped, local.from_cache))
    return Features(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    [s for p in parts for s in p[2]], sum(p[3] for p in parts))


def _own_rows(local: Features, start: int) -> Features:
    """This rank's features, ``kept`` as positions in all the paths; every rank's skipped files."""
    skipped = [s for part in all_gather_objects(local.skipped) for s in part]
    return Features(local.features, local.kept + start, skipped, local.from_cache)


def _extract(backbone: Backbone, paths: list[Path], device: str, batch_size: int, workers: int | None,
             cache: bool | str | Path, decode: str, reporter: Reporter) -> Features:
    """:func:`extract_features` in this process, skipped files listed (never an error)."""
    dev = resolve_device(device)
    dali = _dali_decoder(decode, dev, backbone.preprocess, batch_size, workers)
    jpegs = "dali" if dali is not None else _jpegs_on_device(decode, dev, backbone.preprocess)
    store = None
    keys: list[str | None] = [None] * len(paths)
    if cache is not False:
        root = default_cache_dir() if cache is True else Path(cache)
        extractor = extractor_key(backbone, dev, jpegs)
        store = FeatureCache(root, extractor, backbone.num_features, reporter)
        keys = content_keys(paths)
    found = store.lookup(keys) if store else {}
    out = np.zeros((len(paths), backbone.num_features), dtype=np.float32)
    for i, row in found.items():
        out[i] = row
    todo = np.array([i for i in range(len(paths)) if i not in found], dtype=np.int64)
    if found:
        reporter.note(f"{len(found)} of {len(paths)} images' features from the cache")
    failures: dict[int, str] = {}
    if len(todo):
        pending: list[tuple[np.ndarray, np.ndarray]] = []

        def flush() -> None:
            if store and pending:
                index = np.concatenate([i for i, _ in pending])
                store.store([keys[i] for i in index], np.concatenate([r for _, r in pending]))
            pending.clear()

        try:
            for index, rows in _run_backbone(backbone, [paths[i] for i in todo], dev, batch_size, workers,
                                             jpegs, dali, failures, reporter):
                index = todo[index]
                out[index] = rows
                cacheable = np.array([keys[i] is not None for i in index], dtype=bool)
                pending.append((index[cacheable], rows[cacheable]))
                if sum(len(i) for i, _ in pending) >= STORE_EVERY:
                    flush()
        finally:  # an interruption keeps what was extracted so far
            flush()
        failures = {int(todo[j]): message for j, message in failures.items()}
    skipped = [(paths[i], failures[i]) for i in sorted(failures)]
    kept = np.array([i for i in range(len(paths)) if i not in failures], dtype=np.int64)
    return Features(out[kept], kept, skipped, len(found))


def extractor_key(backbone: Backbone, device: torch.device, jpegs: str) -> dict:
    """Everything that changes a feature value: weights, layer, preprocessing, decoder and precision.

    *jpegs*: where plain JPEGs decode: "cpu" (the workers; "pil" before simplejpeg), "device" (nvJPEG),
    "dali", or "mixed" (nvJPEG for those the workers cannot decode at reduced size).
    """
    return {"name": backbone.name, "digest": backbone.weights_digest, "layer": backbone.layer,
            "preprocess": backbone.preprocess.to_json(), "decode": jpegs,
            "precision": "bf16" if device.type == "cuda" else "fp32"}


def _run_backbone(backbone: Backbone, paths: list[Path], device: torch.device, batch_size: int,
                  workers: int | None, jpegs: str, dali: DaliDecoder | None, failures: dict[int, str],
                  reporter: Reporter) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices into paths, feature rows)`` batch by batch; decode failures go into *failures*."""
    model = inference_model(backbone, device)
    workers = default_workers(device) if workers is None else workers
    loader = chunk_loader(paths, backbone.preprocess, device, batch_size, workers, jpegs)
    normalize, pending = Normalizer(backbone.preprocess, device), None
    try:
        with (reporter.task(f"extracting {backbone.name}", len(paths)) as task,
              thread_budget(workers_to_spare(device.type, workers)), inference_context(device)):
            for index, images in _batches(loader, normalize, batch_size, failures, task, dali):
                feats = _to_host(model(images))
                if pending is not None:
                    yield _collect(*pending, task)
                pending = (index, *feats)
            if pending is not None:
                yield _collect(*pending, task)
    finally:
        backbone.model.to("cpu")


def _jpegs_on_device(decode: str, device: torch.device, preprocess: Preprocess) -> str:
    """Where plain JPEGs decode when DALI does not: "cpu", "device" or "mixed" (``decode="auto"`` on CUDA).

    "mixed": JPEGs the workers can decode at reduced size (DCT scaling) stay with them, the others go
    to nvJPEG, which decodes every pixel. Measured on an H200 with 16 cores (resnet50): on 500x375
    JPEGs nvJPEG's pipeline ran 7.4k/s against the workers' 5.0k/s, on 0.3-12 MP photos 572/s
    against 639/s, and xferkit with nvJPEG reached 379 photos/s against 614/s with the workers.
    """
    if decode not in DECODE_CHOICES:
        raise XferkitError(f"unknown decode {decode!r}; use one of {', '.join(DECODE_CHOICES)}.")
    if decode == "workers" or decode == "auto" and device.type != "cuda":
        return "cpu"
    works = supports_tensor_resize(preprocess) and gpu_decode_available(device)
    if decode == "device" and not works:
        raise XferkitError(f"JPEGs cannot be decoded on {device} here (torchvision without nvJPEG, or "
                           f"a {preprocess.interpolation} resize); use decode='workers'.")
    return "cpu" if not works else "device" if decode == "device" else "mixed"


def _dali_decoder(decode: str, device: torch.device, preprocess: Preprocess, batch_size: int,
                  workers: int | None) -> DaliDecoder | None:
    """The DALI decoder for ``decode='dali'`` (an error where it cannot run), or for ``'auto'`` on CUDA
    where DALI is installed and reproduces the preprocessing; else ``None``."""
    recipe = preprocess.resize_size, preprocess.input_size, preprocess.interpolation
    if decode != "dali" and not (decode == "auto" and device.type == "cuda" and dali_available()
                                 and dali_supports(*recipe)):
        return None
    threads = default_workers(device) if workers is None else workers
    return DaliDecoder(device, *recipe, max_batch=batch_size, threads=threads)


def _batches(loader: DataLoader, normalize: Normalizer, batch_size: int, failures: dict, task,
             dali: DaliDecoder | None):
    """Normalised device batches of up to *batch_size* images, joined from the loader's chunks."""
    index, images = [], []
    if dali is None:
        chunks = ((c, _nvjpeg_parts(c, loader.dataset.preprocess, normalize.device)) for c in loader)
    else:
        chunks = _ahead(loader, lambda chunk: [dali.decode(chunk.jpegs)])
    for chunk, jpeg_parts in chunks:
        known = len(failures)
        failures.update(chunk.failed)
        for part_index, part in _chunk_parts(chunk, loader.dataset, jpeg_parts, failures):
            index.append(part_index)
            images.append(normalize(part))
        task.advance(len(failures) - known)
        if sum(map(len, index)) >= batch_size:
            yield torch.cat(index), torch.cat(images)
            index, images = [], []
    if index:
        yield torch.cat(index), torch.cat(images)


#: A chunk's JPEGs as a device decoder returns them: (positions decoded, their images, positions rejected).
JpegParts = Iterable[tuple[list[int], torch.Tensor | None, list[int]]]


def _ahead(chunks: Iterable[Chunk], decode: Callable[[Chunk], JpegParts]
           ) -> Iterator[tuple[Chunk, JpegParts]]:
    """Each chunk with its decoded JPEGs, the next chunk decoding in a thread while this one is used.

    DALI releases the GIL while it decodes (and runs on its own CUDA stream), so batch k+1 decodes
    while the backbone computes batch k.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="xferkit-decode") as pool:
        pending = None
        for chunk in chunks:
            submitted = chunk, pool.submit(decode, chunk)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = submitted
        if pending is not None:
            yield pending[0], pending[1].result()


def _nvjpeg_parts(chunk: Chunk, preprocess: Preprocess, device: torch.device) -> JpegParts:
    """A chunk's JPEGs decoded by torchvision on *device* (nvJPEG on a GPU), resized, part by part."""
    for part in decode_oriented(chunk.jpegs, device) if len(chunk.jpegs) else ():
        positions, images = resize_decoded([(k, image) for k, image in part if image is not None], preprocess)
        yield positions, images, [k for k, image in part if image is None]


def _chunk_parts(chunk: Chunk, dataset: ExtractionItems, jpeg_parts: JpegParts, failures: dict):
    """(index, images) of a chunk: those the workers decoded, then its JPEGs as a device decoder gave them."""
    if len(chunk.index):
        yield chunk.index, chunk.images
    for positions, images, rejected in jpeg_parts:
        if images is not None:
            yield torch.tensor([chunk.jpeg_index[k] for k in positions]), images
        for k in rejected:  # the device decoder refused it: PIL, here
            i, image, message = dataset.decode(chunk.jpeg_index[k])
            if image is None:
                failures[i] = message
            else:
                yield torch.tensor([i]), image[None]


def inference_model(backbone: Backbone, device: torch.device) -> nn.Module:
    """The backbone on *device*, channels-last (oneDNN on CPUs and cuDNN with bf16 both prefer it)."""
    return backbone.model.to(device).to(memory_format=torch.channels_last)


@contextmanager
def inference_context(device: torch.device):
    """No autograd; bf16 autocast on CUDA (CPU stays float32, so its features are exact)."""
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=device.type == "cuda"):
        yield


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


def _collect(index: torch.Tensor, host: torch.Tensor, event: torch.cuda.Event | None, task
             ) -> tuple[np.ndarray, np.ndarray]:
    if event is not None:
        event.synchronize()
    task.advance(len(index))
    return index.numpy(), host.numpy().copy()


def refuse_skipped(skipped: list[tuple[Path, str]]) -> None:
    """``--strict``: the first unreadable file becomes an error instead of a counted skip."""
    if skipped:
        path, msg = skipped[0]
        raise XferkitError(f"cannot read {path}: {msg} ({len(skipped)} unreadable file(s) in all; "
                           "remove them, or drop --strict to skip them).")
