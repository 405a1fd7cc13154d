"""Push images through a backbone once, in batches, and keep the features (cached on disk)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from xferkit.backbones import Backbone, Preprocess
from xferkit.cache import FeatureCache, default_cache_dir, file_key
from xferkit.devices import default_workers, resolve_device
from xferkit.errors import XferkitError
from xferkit.images import UnreadableImage, load_rgb
from xferkit.progress import progress_bar


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
        try:
            return i, image_to_tensor(self.paths[i], self.preprocess), ""
        except UnreadableImage as err:
            return i, None, str(err).removeprefix(f"{self.paths[i]}: ")


def collate_images(items):
    """Stack the images that decoded; pass the failures along as (index, message)."""
    ok = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, msg) for i, t, msg in items if t is None]
    images = torch.stack([t for _, t in ok]) if ok else torch.empty(0, dtype=torch.uint8)
    return torch.tensor([i for i, _ in ok], dtype=torch.long), images, failed


class Normalizer:
    """uint8 batches to normalised float on the device (moving uint8 is 4x less traffic)."""

    def __init__(self, preprocess: Preprocess, device: torch.device):
        std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        x = x * self.scale - self.shift
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def image_loader(paths: list[Path], preprocess: Preprocess, device: torch.device,
                 batch_size: int, workers: int | None) -> DataLoader:
    workers = default_workers(device) if workers is None else workers
    return DataLoader(ImageTensors(paths, preprocess), batch_size=batch_size, num_workers=workers,
                      collate_fn=collate_images, pin_memory=device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def extract_features(backbone: Backbone, paths: list[Path], device: str = "auto",
                     batch_size: int = 64, workers: int | None = None,
                     cache_dir: Path | None | bool = None, strict: bool = False,
                     progress: bool = True) -> Features:
    """Features for *paths* (rows in input order, skipped files left out and listed).

    ``cache_dir=None`` uses the default cache, ``False`` disables it. ``strict`` turns the
    first unreadable file into an error instead of a counted skip.
    """
    paths = [Path(p) for p in paths]
    cache = None
    if cache_dir is not False:
        cache = FeatureCache(cache_dir or default_cache_dir(), _extractor_key(backbone))
    keys = [file_key(p) for p in paths] if cache else []
    found, failed = cache.lookup(keys) if cache else ({}, {})
    todo = [i for i in range(len(paths)) if i not in found and i not in failed]

    out = np.zeros((len(paths), backbone.num_features), dtype=np.float32)
    for i, row in found.items():
        out[i] = row
    new_failures = {}
    if todo:
        computed, new_failures = _run_backbone(backbone, [paths[i] for i in todo], device,
                                               batch_size, workers, progress)
        for j, row in computed.items():
            out[todo[j]] = row
        new_failures = {todo[j]: msg for j, msg in new_failures.items()}
        if cache:
            done = sorted(computed)
            cache.store([keys[todo[j]] for j in done],
                        np.stack([computed[j] for j in done]) if done else np.zeros((0, 0)),
                        {keys[i]: msg for i, msg in new_failures.items()})
    failed.update(new_failures)
    skipped = [(paths[i], failed[i]) for i in sorted(failed)]
    if strict and skipped:
        path, msg = skipped[0]
        raise XferkitError(f"cannot read {path}: {msg} ({len(skipped)} unreadable file(s) in all; "
                           "remove them, or drop --strict to skip them).")
    kept = np.array([i for i in range(len(paths)) if i not in failed], dtype=np.int64)
    return Features(out[kept], kept, skipped)


def _run_backbone(backbone: Backbone, paths: list[Path], device: str, batch_size: int,
                  workers: int | None, progress: bool) -> tuple[dict[int, np.ndarray], dict]:
    dev = resolve_device(device)
    model = backbone.model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    normalize = Normalizer(backbone.preprocess, dev)
    rows, failures = {}, {}
    loader = image_loader(paths, backbone.preprocess, dev, batch_size, workers)
    with (progress_bar(f"extracting {backbone.name}", len(paths), enabled=progress) as advance,
          torch.inference_mode(),
          torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")):
        for index, images, failed in loader:
            failures.update(failed)
            if len(index):
                feats = model(normalize(images)).float().cpu().numpy()
                rows.update(zip(index.tolist(), feats, strict=True))
            advance(len(index) + len(failed))
    backbone.model.to("cpu")
    return rows, failures


def _extractor_key(backbone: Backbone) -> dict:
    return {"name": backbone.name, "digest": backbone.weights_digest, "layer": backbone.layer,
            "preprocess": backbone.preprocess.to_json()}
