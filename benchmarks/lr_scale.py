"""The LR head on a feature matrix larger than it should hold: 10^6 x 512 float32 (2 GB), memory-mapped.

    python benchmarks/lr_scale.py [--rows 1000000] [--dim 512] [--classes 10] [--chunk-rows 32768]
                                  [--max-iter 1000]

Writes synthetic CNN-like features (non-negative, correlated channels, overlapping classes) to a
``.npy`` file a block at a time, then fits ``LogisticHead(C=1).fit_streamed`` on
``np.load(..., mmap_mode="r")``: the exact full-batch gradient, a chunk of rows at a time. Prints
the process's peak RSS (``resource.getrusage``: the most it ever held, generation, torch and mapped
file pages included) against the matrix's size, the fit's time and L-BFGS iterations, and the
training accuracy on a sample.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from xferkit.heads import LogisticHead

#: Rows generated at a time (float64 temporaries: a few tens of MB).
WRITE_ROWS = 8192


def write_features(path: Path, rows: int, dim: int, classes: int, seed: int = 0) -> np.ndarray:
    """Write a ``(rows, dim)`` float32 ``.npy`` block by block (never whole in memory); return the labels."""
    rng = np.random.default_rng(seed)
    latent = dim // 2
    centres = rng.normal(0, 4 / np.sqrt(latent), (classes, latent))
    decay = (1.0 + np.arange(latent)) ** -0.6  # power-law variances: an ill-conditioned covariance
    projection = rng.normal(0, 3 / np.sqrt(latent), (latent, dim))
    y = rng.integers(0, classes, rows)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (rows, dim)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, rows, WRITE_ROWS):
            block = np.random.default_rng([seed, start])
            labels = y[start:start + WRITE_ROWS]
            z = (centres[labels] + block.normal(0, 1.0, (len(labels), latent))) * decay
            X = np.maximum(z @ projection + block.normal(0, 0.05, (len(labels), dim)) + 0.2, 0)
            f.write(X.astype(np.float32).tobytes())
    return y


def peak_rss_mb() -> float:
    """The most memory this process has held so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--chunk-rows", type=int, default=32768)
    parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations at most (a few "
                        "suffice to measure memory and the time per iteration)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/xferkit-lr-scale.npy"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    y = write_features(args.data, args.rows, args.dim, args.classes)
    written = time.perf_counter() - started
    X = np.load(args.data, mmap_mode="r")
    before = peak_rss_mb()
    started = time.perf_counter()
    head = LogisticHead(C=1.0, max_iter=args.max_iter).fit_streamed(X, y, chunk_rows=args.chunk_rows)
    seconds, peak = time.perf_counter() - started, peak_rss_mb()
    sample = slice(0, min(args.rows, 20_000))  # predict copies its input: a sample keeps the peak the fit's
    result = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "chunk_rows": args.chunk_rows,
              "matrix_mb": round(X.nbytes / 2**20, 1), "peak_rss_mb_before_fit": round(before, 1),
              "peak_rss_mb": round(peak, 1), "fit_s": round(seconds, 1), "write_s": round(written, 1),
              "iterations": head.n_iter_,
              "train_accuracy_sample": round(float((head.predict(X[sample]) == y[sample]).mean()), 4)}
    print(f"| {args.rows}x{args.dim}, {args.classes} classes | matrix {result['matrix_mb']} MB | "
          f"peak RSS {result['peak_rss_mb']} MB ({result['peak_rss_mb_before_fit']} before the fit) | "
          f"fit {result['fit_s']} s, {head.n_iter_} iterations | "
          f"train accuracy {result['train_accuracy_sample']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    args.data.unlink()
    return result


if __name__ == "__main__":
    main()
