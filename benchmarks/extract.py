"""Extraction throughput on the same JPEGs: the backbone alone, the hand-written pipeline, xferkit.

    python benchmarks/extract.py [--backbone resnet50] [--images N] [--device cpu|cuda]

Generates (or reuses) a folder of photo-like JPEGs of mixed sizes (640x480 up to 12 megapixels,
several classes), then measures images/s, in one process and on the same files, of
(1) the backbone alone on tensors already in memory (the ceiling: the faster of torch's default
threads and xferkit's thread budget), (2) the naive pipeline (torchvision ImageFolder + PIL
transforms + DataLoader(num_workers=cores)) and (3) xferkit's ``extract_features`` (the path
``repurpose`` runs, cache disabled); on CUDA also (3b) xferkit with the CPU workers decoding and
(4) xferkit's input pipeline alone, for each decoder here, with a stand-in backbone that only
averages the pixels (the decode limit); ``--decoders N`` adds the CPU decoders' table (decoders.py).
All three run the backbone the same way (xferkit's ``inference_model``), so the ratios measure
the input pipeline. Peak memory (PSS of the process and its workers) is sampled during each
phase; xferkit runs again on a quarter of the images to show that its peak does not grow with
their number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from xferkit.backbones import create_backbone
from xferkit.core.devices import available_cores, default_workers, resolve_device
from xferkit.core.threads import thread_budget, workers_to_spare
from xferkit.features import extract_features
from xferkit.features.extract import inference_context, inference_model
from xferkit.io.jpeg_dali import dali_available
from xferkit.io.jpeg_device import gpu_decode_available

#: (width, height) of the generated photos, cycled: 0.3 to 12 megapixels, some portrait.
MIXED_SIZES = ((640, 480), (1024, 768), (1600, 1200), (480, 640), (2048, 1536), (3264, 2448),
               (1536, 2048), (4032, 3024))
SMALL_SIZES = ((500, 375), (375, 500))
CLASSES = ("beach", "city", "forest", "snow")


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour fields + mid-scale texture + sensor grain: compresses like a real photo."""
    blobs = rng.integers(0, 256, (max(2, height // 200), max(2, width // 200), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(blobs).resize((width, height), Image.BICUBIC), dtype=np.int16)
    texture = rng.normal(128, 18, (height // 8 + 1, width // 8 + 1, 3)).clip(0, 255).astype(np.uint8)
    base += np.asarray(Image.fromarray(texture).resize((width, height), Image.BILINEAR), dtype=np.int16)
    grain = rng.normal(-128, 6, (256, 256, 3)).astype(np.int16)
    base += np.tile(grain, (height // 256 + 1, width // 256 + 1, 1))[:height, :width]
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def _write_photo(job: tuple[Path, int, int, int]) -> None:
    path, width, height, seed = job
    tmp = path.with_name(f".{path.name}.tmp")
    synthetic_photo(width, height, np.random.default_rng(seed)).save(tmp, "JPEG", quality=90)
    tmp.replace(path)


def make_images(root: Path, n: int, sizes: tuple[tuple[int, int], ...]) -> list[Path]:
    """``n`` JPEGs under ``root/CLASS/``, reusing those already there (generation is seeded)."""
    from concurrent.futures import ProcessPoolExecutor

    paths = [root / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg" for i in range(n)]
    jobs = [(p, *sizes[i % len(sizes)], i) for i, p in enumerate(paths) if not p.is_file()]
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
    if jobs:
        print(f"generating {len(jobs)} JPEGs in {root} ...", file=sys.stderr)
        with ProcessPoolExecutor(available_cores()) as pool:
            list(pool.map(_write_photo, jobs, chunksize=4))
    return paths


class PeakMemory:
    """Samples the proportional set size (PSS) of this process and its children every 50 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, sum(_pss(pid) for pid in _process_tree(os.getpid())))

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def _process_tree(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += _process_tree(int(child))
    return found


def _pss(pid: int) -> int:
    """PSS in bytes (shared pages split between sharers), or RSS where smaps_rollup is missing."""
    for file, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ceiling(backbone, device: torch.device, n: int, batch_size: int, image_size: tuple[int, int]
                 ) -> float:
    """Images/s of the backbone on random, already normalised tensors resident on the device."""
    model = inference_model(backbone, device)  # extract_features hands the model back on the CPU
    x = torch.randn(batch_size, 3, *image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    with inference_context(device):
        for _ in range(3):
            model(x)
        _sync(device)
        start = time.perf_counter()
        for done in range(0, n, batch_size):
            model(x[: min(batch_size, n - done)])
        _sync(device)
    return n / (time.perf_counter() - start)


def time_naive(backbone, device: torch.device, root: Path, batch_size: int, preprocess) -> float:
    """Images/s of the pipeline people write by hand (PIL decode of the full image, default threads)."""
    model = inference_model(backbone, device)
    transform = T.Compose([
        T.Resize(preprocess.resize_size, interpolation=T.InterpolationMode(preprocess.interpolation)),
        T.CenterCrop(preprocess.input_size), T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=available_cores(),
                        pin_memory=device.type == "cuda")
    start = time.perf_counter()
    with inference_context(device):
        for images, _ in loader:
            model(images.to(device))
    _sync(device)
    return len(dataset) / (time.perf_counter() - start)


def time_xferkit(backbone, paths: list[Path], device: str, batch_size: int, workers: int | None,
                 decode: str = "auto") -> float:
    start = time.perf_counter()
    feats = extract_features(backbone, paths, device=device, batch_size=batch_size, workers=workers,
                             cache=False, decode=decode)
    elapsed = time.perf_counter() - start
    assert len(feats.kept) == len(paths), feats.skipped[:3]
    return len(paths) / elapsed


class PooledPixels(nn.Module):
    """A stand-in backbone that only averages each image's channels: extraction then times the input
    pipeline alone (read, decode, resize, transfer, normalise)."""

    num_features = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean((2, 3))


def decode_limits(backbone, paths: list[Path], device: torch.device, batch_size: int,
                  workers: int | None) -> dict[str, float]:
    """Images/s of xferkit's input pipeline alone, per decoder available here (the GPU's decode limit)."""
    names = ["workers"]
    if gpu_decode_available(device):
        names.append("device")
    if dali_available():
        names.append("dali")
    pixels_only = dataclasses.replace(backbone, model=PooledPixels())
    return {name: time_xferkit(pixels_only, paths, str(device), batch_size, workers, decode=name)
            for name in names}


class Phases(dict):
    """Images/s by phase, each also printed as it is measured (a later failure keeps the earlier ones)."""

    def __setitem__(self, name: str, rate: float) -> None:
        print(f"{name}: {rate:.1f} images/s", file=sys.stderr, flush=True)
        super().__setitem__(name, rate)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    sizes = MIXED_SIZES if args.sizes == "mixed" else SMALL_SIZES
    root = Path(args.data or Path(os.environ.get("TMPDIR", "/tmp")) / f"xferkit-bench-{args.sizes}")
    # ImageFolder reads every file in the folder: keep exactly the first N there.
    paths = make_images(root, args.images, sizes)
    for extra in {p for p in root.glob("*/*.jpg")} - set(paths):
        extra.unlink()
    batch_size = args.batch_size or (256 if device.type == "cuda" else 32)
    backbone = create_backbone(args.backbone, pretrained=False)
    preprocess = backbone.preprocess
    result = {"backbone": args.backbone, "device": str(device), "images": len(paths),
              "sizes": args.sizes, "megapixels_mean": round(float(np.mean(
                  [w * h for w, h in (sizes[i % len(sizes)] for i in range(len(paths)))])) / 1e6, 2),
              "batch_size": batch_size, "cores": available_cores(),
              "torch_threads": torch.get_num_threads(), "machine": _machine(device)}
    phases = Phases()
    phases["ceiling_default_threads"] = time_ceiling(backbone, device, len(paths), batch_size,
                                                     preprocess.input_size)
    with PeakMemory() as mem:
        time_ceiling(backbone, device, len(paths), batch_size, preprocess.input_size)
    result["peak_mb_ceiling"] = mem.peak_mb
    workers = default_workers(device) if args.workers is None else args.workers
    with thread_budget(workers_to_spare(device.type, workers)) as threads:
        phases["ceiling_budget_threads"] = time_ceiling(backbone, device, len(paths), batch_size,
                                                        preprocess.input_size)
    result["budget_threads"] = threads
    phases["ceiling"] = max(phases["ceiling_default_threads"], phases["ceiling_budget_threads"])
    # Timed without the memory sampler: reading PSS walks the page tables of every process and
    # slowed what it watched by up to 2x on 2 cores; the peaks come from separate passes.
    phases["naive"] = time_naive(backbone, device, root, batch_size, preprocess)
    phases["xferkit"] = time_xferkit(backbone, paths, args.device, batch_size, args.workers)
    if device.type == "cuda":  # what decoding every JPEG on the CPU workers instead would give
        phases["xferkit_cpu_decode"] = time_xferkit(backbone, paths, args.device, batch_size,
                                                    args.workers, decode="workers")
        limits = decode_limits(backbone, paths, device, batch_size, args.workers)
        for name, rate in limits.items():
            phases[f"decode_limit_{name}"] = rate
        phases["decode_limit"] = max(limits.values())
    with PeakMemory() as mem:
        time_naive(backbone, device, root, batch_size, preprocess)
    result["peak_mb_naive"] = mem.peak_mb
    with PeakMemory() as mem:
        time_xferkit(backbone, paths, args.device, batch_size, args.workers)
    result["peak_mb_xferkit"] = mem.peak_mb
    quarter = paths[: max(1, len(paths) // 4)]
    with PeakMemory() as mem:
        time_xferkit(backbone, quarter, args.device, batch_size, args.workers)
    result["peak_mb_xferkit_quarter"] = mem.peak_mb
    result["images_per_s"] = {k: round(v, 2) for k, v in phases.items()}
    result["xferkit_over_ceiling"] = round(phases["xferkit"] / phases["ceiling"], 3)
    result["xferkit_over_naive"] = round(phases["xferkit"] / phases["naive"], 3)
    if "decode_limit" in phases:  # the GPU target: >= 0.9 of the lower of the two limits
        result["xferkit_over_limit"] = round(
            phases["xferkit"] / min(phases["decode_limit"], phases["ceiling"]), 3)
    if args.decoders:
        import decoders

        result["decoders_images"] = min(args.decoders, len(paths))
        result["decoders"] = decoders.measure(paths[:args.decoders], preprocess)
    return result


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{available_cores()} cores of {cpu}{gpu}, torch {torch.__version__}"


def print_table(r: dict) -> None:
    ips = r["images_per_s"]
    print(f"\n{r['backbone']} on {r['device']} - {r['images']} JPEGs ({r['sizes']}, mean "
          f"{r['megapixels_mean']} MP), batch {r['batch_size']}\n{r['machine']}\n")
    print("| path | images/s | peak memory (MB) |\n| --- | ---: | ---: |")
    print(f"| 1. backbone alone, tensors in memory, torch's default {r['torch_threads']} threads | "
          f"{ips['ceiling_default_threads']:.1f} | {r['peak_mb_ceiling']} |")
    print(f"| 1b. the same within xferkit's thread budget ({r['budget_threads']}) | "
          f"{ips['ceiling_budget_threads']:.1f} | |")
    print(f"| 2. naive: ImageFolder + PIL + DataLoader({r['cores']} workers) | {ips['naive']:.1f} | "
          f"{r['peak_mb_naive']} |")
    print(f"| 3. xferkit extract_features (no cache) | {ips['xferkit']:.1f} | {r['peak_mb_xferkit']} "
          f"({r['peak_mb_xferkit_quarter']} on {max(1, r['images'] // 4)} images) |")
    if "xferkit_cpu_decode" in ips:
        print(f"| 3b. the same, JPEGs decoded by the CPU workers (decode='workers') | "
              f"{ips['xferkit_cpu_decode']:.1f} | |")
    for name in ("workers", "device", "dali"):
        if f"decode_limit_{name}" in ips:
            print(f"| 4. input pipeline alone (no backbone), decode='{name}' | "
                  f"{ips[f'decode_limit_{name}']:.1f} | |")
    print(f"\n3/max(1, 1b) = {r['xferkit_over_ceiling']:.2f}   3/2 = {r['xferkit_over_naive']:.2f}")
    if "xferkit_over_limit" in r:
        print(f"3/min(best of 4, max(1, 1b)) = {r['xferkit_over_limit']:.2f}")
    if "decoders" in r:
        import decoders

        decoders.print_table(r["decoders"], f"CPU decoders, first {r['decoders_images']} of these JPEGs")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 256 on CUDA, 32 on CPU")
    parser.add_argument("--workers", type=int, default=None,
                        help="xferkit's decode workers (default: its own choice)")
    parser.add_argument("--sizes", choices=("mixed", "small"), default="mixed",
                        help="mixed: 0.3-12 MP photos; small: 500x375, like the issue's first run")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder for the generated JPEGs (default: $TMPDIR/xferkit-bench-SIZES)")
    parser.add_argument("--decoders", type=int, default=0, metavar="N",
                        help="also time the CPU decoders (decoders.py) on the first N of the JPEGs")
    parser.add_argument("--json", type=Path, default=Path("extract-benchmark.json"))
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
