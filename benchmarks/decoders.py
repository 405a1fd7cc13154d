"""CPU JPEG decoders against xferkit's PIL path: CPU time per image and pixel agreement, same files.

    python benchmarks/decoders.py FOLDER_OF_JPEGS [--backbone resnet18]

Each decoder turns a JPEG into the backbone's input (decode at reduced size where the codec allows,
EXIF orientation, resize of the shorter side, centre crop): xferkit's path (simplejpeg scaling by
1/2, 1/4, 1/8, then torch's uint8 antialiased resize), PIL in draft mode (the same scalings; what
xferkit used before and still uses for other files), PIL decoding the whole image, and the
libjpeg-turbo bindings ``simplejpeg`` and ``PyTurboJPEG`` scaling by any M/8 with PIL's resize,
when they can be loaded. Times are CPU
seconds of this process on one thread (robust on a shared machine), best of three rounds.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xferkit.backbones import create_backbone
from xferkit.io.images import load_rgb, read_jpeg
from xferkit.io.jpeg_dali import DaliDecoder
from xferkit.io.jpeg_device import JpegBatch
from xferkit.preprocess import Preprocess, image_to_tensor, resized_centre

#: EXIF orientation -> the PIL transpose that displays it upright (as ImageOps.exif_transpose).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
Decoder = Callable[[Path, Preprocess], np.ndarray]


def xferkit_path(path: Path, preprocess: Preprocess) -> np.ndarray:
    """xferkit's own path (loader workers): simplejpeg for plain JPEGs, PIL for the rest."""
    return image_to_tensor(path, preprocess).permute(1, 2, 0).numpy()


def pil_draft(path: Path, preprocess: Preprocess) -> np.ndarray:
    """PIL in draft mode (DCT scaling by 1/2, 1/4, 1/8) and PIL's resize of the crop's box."""
    return np.asarray(resized_centre(load_rgb(path, min_size=preprocess.resize_size), preprocess))


def pil_full(path: Path, preprocess: Preprocess) -> np.ndarray:
    return np.asarray(resized_centre(load_rgb(path), preprocess))


def _header(data: bytes) -> tuple[int, tuple[int, int]]:
    """EXIF orientation and stored size, from the header only."""
    with Image.open(io.BytesIO(data)) as img:
        return img.getexif().get(0x0112, 1), img.size


def _finish(pixels: np.ndarray, orientation: int, preprocess: Preprocess) -> np.ndarray:
    img = Image.fromarray(pixels)
    img = img.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else img
    return np.asarray(resized_centre(img, preprocess))


def _scaled(size: tuple[int, int], preprocess: Preprocess) -> tuple[int, int]:
    """The smallest decoded size whose shorter side still reaches the resize target."""
    scale = min(1.0, preprocess.resize_size / min(size))
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


def simplejpeg_decoder() -> Decoder:
    simplejpeg = importlib.import_module("simplejpeg")

    def decode(path: Path, preprocess: Preprocess) -> np.ndarray:
        data = path.read_bytes()
        orientation, size = _header(data)
        width, height = _scaled(size, preprocess)
        pixels = simplejpeg.decode_jpeg(data, min_width=width, min_height=height)
        return _finish(pixels, orientation, preprocess)

    return decode


def turbojpeg_decoder() -> Decoder:
    turbo = importlib.import_module("turbojpeg").TurboJPEG()  # raises where libturbojpeg is missing

    def decode(path: Path, preprocess: Preprocess) -> np.ndarray:
        data = path.read_bytes()
        orientation, size = _header(data)
        scale = min(1.0, preprocess.resize_size / min(size))
        factor = min((f for f in turbo.scaling_factors if f[0] / f[1] >= scale), key=lambda f: f[0] / f[1])
        return _finish(turbo.decode(data, pixel_format=0, scaling_factor=factor), orientation, preprocess)

    return decode


def dali_cpu_decoder() -> Decoder:
    """xferkit's decode='dali' pipeline on the CPU (libjpeg-turbo, whole image, antialiased resize of the
    crop's box), one image a run: extraction runs chunks of up to 64, ~20% less CPU on 500x375."""
    importlib.import_module("nvidia.dali")  # ImportError where the dali extra is not installed

    @functools.cache
    def pipeline(preprocess: Preprocess) -> DaliDecoder:
        return DaliDecoder(torch.device("cpu"), preprocess.resize_size, preprocess.input_size,
                           preprocess.interpolation, max_batch=1, threads=1)

    def decode(path: Path, preprocess: Preprocess) -> np.ndarray:
        _, images, _ = pipeline(preprocess).decode(JpegBatch.of([read_jpeg(path)]))
        return images[0].permute(1, 2, 0).numpy()

    return decode


#: name -> the decoder, or a function that builds it (and raises where it cannot be loaded).
DECODERS: dict[str, Callable[[], Decoder]] = {"pil draft": lambda: pil_draft,
                                              "xferkit (simplejpeg, torch resize)": lambda: xferkit_path,
                                              "pil full": lambda: pil_full,
                                              "simplejpeg M/8, pil resize": simplejpeg_decoder,
                                              "pyturbojpeg M/8, pil resize": turbojpeg_decoder,
                                              "dali cpu (full decode, one a run)": dali_cpu_decoder}


def available() -> dict[str, Decoder | str]:
    """Every decoder that loads here; for the others, why not."""
    found: dict[str, Decoder | str] = {}
    for name, build in DECODERS.items():
        try:
            found[name] = build()
        except (ImportError, OSError, RuntimeError) as err:  # not installed, or its library missing
            found[name] = f"unavailable: {type(err).__name__}: {str(err).splitlines()[0]}"
    return found


def measure(paths: list[Path], preprocess: Preprocess, rounds: int = 3) -> dict[str, dict]:
    """CPU ms per image (one thread, best round) and the largest per-image mean absolute difference
    from PIL's draft path (0-255 scale), for each decoder."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = [pil_draft(p, preprocess).astype(np.int16) for p in paths]
        results: dict[str, dict] = {}
        for name, decode in available().items():
            if isinstance(decode, str):
                results[name] = {"status": decode}
                continue
            best, out = math.inf, []
            for _ in range(rounds):
                start = time.process_time()
                out = [decode(p, preprocess) for p in paths]
                best = min(best, time.process_time() - start)
            diff = max(float(np.abs(o.astype(np.int16) - r).mean())
                       for o, r in zip(out, reference, strict=True))
            results[name] = {"status": "ok", "cpu_ms_per_image": round(1000 * best / len(paths), 3),
                             "max_mean_abs_diff": round(diff, 3)}
        return results
    finally:
        torch.set_num_threads(before)


def print_table(results: dict[str, dict], title: str) -> None:
    print(f"\n{title}\n\n| decoder | CPU ms / image | vs PIL draft | max mean abs diff |\n"
          "| --- | ---: | ---: | ---: |")
    base = results["pil draft"]["cpu_ms_per_image"]
    for name, r in results.items():
        if r["status"] != "ok":
            print(f"| {name} | {r['status']} | | |")
        else:
            print(f"| {name} | {r['cpu_ms_per_image']:.2f} | {r['cpu_ms_per_image'] / base:.2f}x | "
                  f"{r['max_mean_abs_diff']:.2f} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--json", type=Path, default=Path("decoders-benchmark.json"))
    args = parser.parse_args(argv)
    paths = sorted(args.folder.rglob("*.jpg"))
    results = measure(paths, create_backbone(args.backbone, pretrained=False).preprocess)
    print_table(results, f"{len(paths)} JPEGs in {args.folder}")
    args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
