"""LR head fit time and test accuracy against scikit-learn's LogisticRegression(lbfgs), same features.

    python benchmarks/heads.py [--device cpu|cuda] [--sizes 5000x512 50000x2048]

Features are synthetic but shaped like a CNN's pooled ones (see ``cnn_like_features``). Every
fit standardises them and minimises the same objective; the table gives each one's distance to
the best objective reached, so speed is compared at equal precision. scikit-learn runs with its
default tolerance (what the old head did, far from the optimum here) and with a tight one. With
``--grid`` sizes the head also picks C on a validation split (seven values, fitted together)
against scikit-learn fitting the seven one by one.

The thread table fits each feature head (lr, gp, bnn, as ``repurpose`` runs them) on features of
sample_data's size (400x1280, 10 classes), side by side in this process: with the libraries'
default threads, within xferkit's thread budget (what ``repurpose`` uses) and on one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from xferkit.core.threads import thread_budget, thread_count
from xferkit.heads.lr import C_GRID, LogisticHead
from xferkit.model.registry import create_head

#: Thread settings of the thread table: the libraries' defaults, xferkit's budget, one thread.
THREAD_SETTINGS = {"one": lambda: thread_budget(threads=1), "budget": thread_budget, "default": nullcontext}


def cnn_like_features(n: int, dim: int, n_classes: int, seed: int = 0, separation: float = 4.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """ReLU of a random projection of latent class structure whose variances fall off as a power law.

    Like pooled CNN features: non-negative, every channel a mix of a few hundred directions of
    very different strengths (an ill-conditioned covariance), classes that overlap.
    """
    rng = np.random.default_rng(seed)
    latent = dim // 2
    y = rng.integers(0, n_classes, n)
    centres = rng.normal(0, separation / np.sqrt(latent), (n_classes, latent))  # same difficulty at any dim
    z = (centres[y] + rng.normal(0, 1.0, (n, latent))) * (1.0 + np.arange(latent)) ** -0.6
    projection = rng.normal(0, 3 / np.sqrt(latent), (latent, dim))
    X = np.maximum(z @ projection + rng.normal(0, 0.05, (n, dim)) + 0.2, 0)
    return X.astype(np.float32), y


def objective(Xs: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
    """scikit-learn's multinomial objective (mean log-loss + ||W||^2 / (2 C n)), in float64."""
    Z = Xs.astype(np.float64) @ coef.T.astype(np.float64) + intercept
    Z -= Z.max(axis=1, keepdims=True)
    nll = np.log(np.exp(Z).sum(axis=1)) - Z[np.arange(len(y)), y]
    return float(nll.mean() + (coef.astype(np.float64) ** 2).sum() / (2 * C * len(y)))


def _full_rank(model) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients with one row per class (scikit-learn's binary convention keeps one row)."""
    if model.coef_.shape[0] > 1:
        return model.coef_, model.intercept_
    return np.vstack([-model.coef_, model.coef_]) / 2, np.r_[-model.intercept_, model.intercept_] / 2


def bench(n: int, dim: int, n_classes: int, device: str, max_iter: int, grid: bool) -> list[dict]:
    X, y = cnn_like_features(int(n * 1.4), dim, n_classes)
    train, val, test = slice(0, n), slice(n, int(n * 1.2)), slice(int(n * 1.2), None)
    scaler = StandardScaler().fit(X[train])
    Xs, Xv, Xt = (scaler.transform(X[part]) for part in (train, val, test))
    rows = []

    def add(name: str, seconds: float, coef, intercept, C: float, n_iter: int, on_train: bool = True) -> None:
        """A row; *on_train* False: fitted on train+val, so its objective on train is not comparable."""
        accuracy = np.mean((Xt @ coef.T + intercept).argmax(axis=1) == y[test])
        rows.append({"fit": name, "n": n, "dim": dim, "classes": n_classes, "C": C,
                     "seconds": round(seconds, 3), "test_accuracy": round(float(accuracy), 4),
                     "objective": objective(Xs, y[train], coef, intercept, C) if on_train else None,
                     "iterations": n_iter})

    for tol, label in ((1e-4, "default tol=1e-4"), (1e-6, "tol=1e-6")):
        start = time.perf_counter()
        model = LogisticRegression(C=1.0, max_iter=max_iter, tol=tol).fit(Xs, y[train])
        add(f"scikit-learn lbfgs, {label}", time.perf_counter() - start, *_full_rank(model), 1.0,
            int(model.n_iter_.max()))
    for where in dict.fromkeys(("cpu", device)):
        head = LogisticHead(C=1.0, max_iter=max_iter, device=where)
        start = time.perf_counter()
        head.fit(X[train], y[train])
        add(f"xferkit lr ({head.solver_} on {where})", time.perf_counter() - start, *_full_rank(head),
            1.0, head.n_iter_)
    if grid:
        start = time.perf_counter()
        fits = [LogisticRegression(C=C, max_iter=max_iter).fit(Xs, y[train]) for C in C_GRID]
        best = min(fits, key=lambda m: log_loss(y[val], m.predict_proba(Xv), labels=m.classes_))
        add(f"scikit-learn lbfgs, default tol, best of {len(C_GRID)} C on val (the old head)",
            time.perf_counter() - start, *_full_rank(best), best.C, max(int(m.n_iter_.max()) for m in fits))
        # the head holds out the same val rows itself (the last sixth of train+val), then refits on both
        head = LogisticHead(max_iter=max_iter, device=device, validation_fraction=1 / 6, random_state=0)
        both = slice(0, int(n * 1.2))
        start = time.perf_counter()
        head.fit(X[both], y[both])
        seconds = time.perf_counter() - start
        coef, intercept = _full_rank(head)
        # the head's coefficients act on its own standardisation (of train+val): re-express them on ours
        coef = coef / head.scale_ * scaler.scale_
        intercept = intercept + ((scaler.mean_ - head.mean_) / head.scale_) @ _full_rank(head)[0].T
        add(f"xferkit lr ({head.solver_} on {device}), best of {len(C_GRID)} C on a held-out sixth, "
            "refitted on train+val", seconds, coef, intercept, head.C_, head.n_iter_, on_train=False)
    best = {}
    for r in rows:
        if r["objective"] is not None:
            best[r["C"]] = min(best.get(r["C"], np.inf), r["objective"])
    for r in rows:
        r["objective_gap"] = None if r["objective"] is None else float(f"{r['objective'] - best[r['C']]:.3g}")
    return rows


def bench_threads(n: int, dim: int, n_classes: int, heads: list[str]) -> list[dict]:
    """Seconds of each head's fit under each of :data:`THREAD_SETTINGS`, and their ratios to the budget."""
    X, y = cnn_like_features(n, dim, n_classes)
    rows = []
    for name in heads:
        seconds = {}
        for setting, limits in THREAD_SETTINGS.items():
            with limits():
                start = time.perf_counter()
                create_head(name, random_state=0).fit(X, y)
                seconds[setting] = round(time.perf_counter() - start, 3)
            print(f"{name} fit, threads {setting}: {seconds[setting]:.2f} s", file=sys.stderr, flush=True)
        rows.append({"head": name, "n": n, "dim": dim, "classes": n_classes, "seconds": seconds,
                     "default_over_budget": round(seconds["default"] / seconds["budget"], 2),
                     "one_over_budget": round(seconds["one"] / seconds["budget"], 2)})
    return rows


def print_threads(rows: list[dict]) -> None:
    print(f"\nFeature-head fits, default threads (torch {torch.get_num_threads()}, BLAS and OpenMP one a "
          f"core) vs xferkit's budget ({thread_count()} torch/OpenMP, 1 BLAS) vs one thread\n")
    print("| features | head | default s | budget s | one thread s | default / budget | one / budget |\n"
          "| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        s = r["seconds"]
        print(f"| {r['n']}x{r['dim']}, {r['classes']} classes | {r['head']} | {s['default']:.2f} | "
              f"{s['budget']:.2f} | {s['one']:.2f} | {r['default_over_budget']:.2f} | "
              f"{r['one_over_budget']:.2f} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--sizes", nargs="*", default=["5000x512x10", "50000x2048x100"],
                        help="NxDIMxCLASSES problems of the LR comparison (none: skip it)")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--grid", nargs="*", default=["5000x512x10"],
                        help="sizes where C is also chosen on validation")
    parser.add_argument("--thread-size", default="400x1280x10",
                        help="NxDIMxCLASSES of the thread table (default: sample_data's size)")
    parser.add_argument("--thread-heads", nargs="*", default=["lr", "gp", "bnn"],
                        help="heads of the thread table (none: skip it)")
    parser.add_argument("--json", type=Path, default=Path("heads-benchmark.json"))
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        n, dim, k = (int(v) for v in size.split("x"))
        rows += bench(n, dim, k, args.device, args.max_iter, size in args.grid)
    if rows:
        print_lr(rows, args.device)
    n, dim, k = (int(v) for v in args.thread_size.split("x"))
    threads = bench_threads(n, dim, k, args.thread_heads)
    if threads:
        print_threads(threads)
    result = {"lr": rows, "threads": threads}
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


def print_lr(rows: list[dict], device: str) -> None:
    print(f"\nLR head on {device} ({torch.get_num_threads()} torch threads)\n")
    print("| features | fit | C | seconds | test accuracy | objective - best | iterations |\n"
          "| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['n']}x{r['dim']}, {r['classes']} classes | {r['fit']} | {r['C']:g} | "
              f"{r['seconds']:.2f} | {100 * r['test_accuracy']:.2f}% | "
              f"{'-' if r['objective_gap'] is None else format(r['objective_gap'], '.1e')} | "
              f"{r['iterations']} |")

if __name__ == "__main__":
    main()
