"""ONNX export against xferkit's own predict: file size, probability difference, images/s side by side.

    python benchmarks/onnx_export.py MODEL IMAGES... [--batch-size 32] [--workers N] [--json FILE]

Exports the model folder MODEL (``xferkit export``), then predicts IMAGES (files or folders) once
with the model folder (``xferkit predict MODEL``: PyTorch, feature cache off) and once with the
ONNX file (``xferkit predict MODEL.onnx``: onnxruntime), on the CPU, with the same decoding
workers and batch size; a few images go through each first so that neither pays a cold start.
(Named onnx_export.py, not onnx.py: run as a script, that name would shadow the onnx package.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xferkit.api import export
from xferkit.core.devices import available_cores
from xferkit.io.data import expand_image_paths
from xferkit.model import ExtractOptions, load_model

#: Images predicted by each model before the timed run.
WARMUP = 8


def timed_predict(model, paths: list[Path], options: ExtractOptions) -> tuple[np.ndarray, float]:
    """Probabilities of *paths* and the images/s of one run (after a short warm-up)."""
    model.predict(paths[:WARMUP], options)
    start = time.perf_counter()
    proba = model.predict(paths, options).proba
    return proba, len(paths) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model folder written by xferkit repurpose")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "torchscript"))
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    options = ExtractOptions(device="cpu", batch_size=args.batch_size, workers=args.workers, cache=False)
    paths = expand_image_paths(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export(args.model, Path(tmp) / "model.onnx", exporter=args.exporter)
        torch_proba, torch_rate = timed_predict(load_model(args.model), paths, options)
        onnx_proba, onnx_rate = timed_predict(load_model(exported.output), paths, options)
    result = {"model": str(args.model), "images": len(paths), "cores": available_cores(),
              "file_mb": round(exported.bytes / 1e6, 2), "exporter": exported.metadata.exporter,
              "head_method": exported.metadata.head_method, "export_seconds": round(exported.seconds, 1),
              "max_abs_proba_diff": float(np.abs(onnx_proba - torch_proba).max()),
              "images_per_s": {"xferkit": round(torch_rate, 1), "onnxruntime": round(onnx_rate, 1)},
              "onnxruntime_over_xferkit": round(onnx_rate / torch_rate, 2)}
    print(f"{result['file_mb']} MB ({result['exporter']} exporter, head as {result['head_method']}); "
          f"max |p_onnx - p_xferkit| = {result['max_abs_proba_diff']:.2e}; images/s on {len(paths)} images: "
          f"xferkit {torch_rate:.1f}, onnxruntime {onnx_rate:.1f} ({result['onnxruntime_over_xferkit']}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
