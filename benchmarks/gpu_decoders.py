"""JPEG decoders alone on bytes already in memory: torchvision's nvJPEG against nvImageCodec's backends.

    python benchmarks/gpu_decoders.py FOLDER [FOLDER ...] [--images 4096] [--batch-size 256] [--device cuda]

nvImageCodec (``pip install nvidia-nvimgcodec-cu12``; NVIDIA DALI's decoders are built on it)
reaches the GPU's hardware JPEG engines (``HW_GPU_ONLY``: the NVJPG units of an A100/H100/H200),
its CUDA decoder, a hybrid and libjpeg-turbo on the CPU. Each decoder decodes the same files in
batches, full size, EXIF orientation applied; images/s is the best of two passes after a warm-up.
This is the ceiling of decoding itself: xferkit's pipeline (``extract.py``'s row 4) adds reading
the files, the resize and the transfer. ``--device cpu`` runs the CPU decoders only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

#: nvImageCodec's backends, as its ``BackendKind`` names them; "default" lets it choose.
BACKENDS = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU", "CPU_ONLY", "default")


def images_per_s(decode, batches: list[list], device: torch.device) -> float:
    """Best of two passes over *batches* after one warm-up batch."""
    decode(batches[0])
    best = 0.0
    for _ in range(2):
        _sync(device)
        start, n = time.perf_counter(), 0
        for batch in batches:
            decode(batch)
            n += len(batch)
        _sync(device)
        best = max(best, n / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nvimgcodec_decoder(backend: str, device: torch.device):
    """``decode(list of bytes)`` through one nvImageCodec backend; an error if one file fails."""
    from nvidia import nvimgcodec

    device_id = (device.index or 0) if device.type == "cuda" else nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY
    chosen = {} if backend == "default" else {
        "backends": [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, backend))]}
    decoder = nvimgcodec.Decoder(device_id=device_id, **chosen)
    params = nvimgcodec.DecodeParams(apply_exif_orientation=True)

    def decode(batch: list[bytes]) -> list:
        images = decoder.decode(batch, params=params)
        failed = sum(image is None for image in images)
        if failed:
            raise RuntimeError(f"{failed} of {len(batch)} files not decoded")
        return images
    return decode


def measure(folder: Path, n: int, batch_size: int, device: torch.device) -> dict[str, float | str]:
    """Images/s of each decoder on the first *n* JPEGs of *folder* (a string where a decoder fails)."""
    data = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:n]]
    batches = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    tensors = [[torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in b] for b in batches]
    rates: dict[str, float | str] = {"files": len(data)}
    rates["torchvision"] = images_per_s(
        lambda b: decode_jpeg(b, mode=ImageReadMode.RGB, device=device), tensors, device)
    for backend in BACKENDS if device.type == "cuda" else ("CPU_ONLY",):
        try:
            rate = images_per_s(nvimgcodec_decoder(backend, device), batches, device)
        except (ImportError, RuntimeError) as err:
            rate = f"{type(err).__name__}: {err}"[:200]
        rates[f"nvimgcodec {backend}"] = rate
    return rates


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--json", type=Path, default=Path("gpu-decoders.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {str(folder): measure(folder, args.images, args.batch_size, device) for folder in args.folders}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nJPEG decoders alone on {name}, torch {torch.__version__}, batch {args.batch_size}, images/s\n")
    print("| decoder | " + " | ".join(f"{f.name} ({result[str(f)]['files']})" for f in args.folders) + " |")
    print("| --- |" + " ---: |" * len(args.folders))
    for key in next(iter(result.values())):
        if key != "files":
            cells = [result[str(f)][key] for f in args.folders]
            print(f"| {key} | " + " | ".join(f"{c:.0f}" if isinstance(c, float) else c for c in cells) + " |")
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
