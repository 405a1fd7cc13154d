"""The gp head's SVGP at large n: time and peak memory of each phase on 200 000 x 512 synthetic features.

    python benchmarks/gp_scale.py [--rows 200000] [--dim 512] [--classes 10] [--inducing 256]
                                  [--epochs 100]

The features (``lr_scale.py``'s synthetic CNN-like ones) are generated to a ``.npy`` file and read
into memory, as the head takes them. ``GPHead(method="svgp")`` then standardises them, places the
inducing points by k-means on a sample (``KMEANS_ROWS``) and trains in minibatches of
``BATCH_SIZE``. Prints the time of k-means, of the first epoch and of the fit, the epochs run, and
the process's peak RSS (``resource.getrusage``) at each step against the size of the matrix, so the
memory that training adds to the inputs is visible; and the training accuracy on a sample.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from lr_scale import peak_rss_mb, write_features

from xferkit.heads import GPHead


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--inducing", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=100, help="SVGP epochs at most (one measures the "
                        "memory and the time per epoch)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/xferkit-gp-scale.npy"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    y = write_features(args.data, args.rows, args.dim, args.classes)
    X = np.load(args.data)
    args.data.unlink()
    head = GPHead("svgp", inducing=args.inducing, epochs=args.epochs, random_state=0)
    marks = {"before_fit": (time.perf_counter(), peak_rss_mb())}
    kmeans = head._kmeans

    def timed_kmeans(Z):  # the phases: standardisation, then k-means, then the epochs
        marks["kmeans_start"] = (time.perf_counter(), peak_rss_mb())
        points = kmeans(Z)
        marks["kmeans_end"] = (time.perf_counter(), peak_rss_mb())
        return points

    def progress(epoch, total, info):
        marks.setdefault("first_epoch", (time.perf_counter(), peak_rss_mb()))

    head._kmeans = timed_kmeans
    head.fit(X, y, progress=progress)
    marks["fit_end"] = (time.perf_counter(), peak_rss_mb())
    del head._kmeans  # the instance attribute; the saved head never sees it
    start = marks["before_fit"][0]
    sample = slice(0, min(args.rows, 20_000))
    result = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "inducing": args.inducing,
              "matrix_mb": round(X.nbytes / 2**20, 1),
              "peak_rss_mb": {name: round(rss, 1) for name, (_, rss) in marks.items()},
              "seconds": {"standardise": round(marks["kmeans_start"][0] - start, 1),
                          "kmeans": round(marks["kmeans_end"][0] - marks["kmeans_start"][0], 1),
                          "first_epoch": round(marks["first_epoch"][0] - marks["kmeans_end"][0], 1),
                          "fit": round(marks["fit_end"][0] - start, 1)},
              "epochs": head.epochs_,
              "train_accuracy_sample": round(float((head.predict(X[sample]) == y[sample]).mean()), 4)}
    seconds, peak = result["seconds"], result["peak_rss_mb"]
    print(f"| {args.rows}x{args.dim}, {args.classes} classes, {args.inducing} inducing | matrix "
          f"{result['matrix_mb']} MB | peak RSS {peak['before_fit']} MB before the fit, "
          f"{peak['kmeans_start']} after standardising, {peak['fit_end']} at the end | k-means "
          f"{seconds['kmeans']} s, first epoch "
          f"{seconds['first_epoch']} s, fit {seconds['fit']} s ({head.epochs_} epochs) | train accuracy "
          f"{result['train_accuracy_sample']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
