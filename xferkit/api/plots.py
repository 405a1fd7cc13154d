"""PNG figures (matplotlib, Agg backend): confusion matrix and reliability diagrams."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xferkit.core.metrics import reliability_bins  # noqa: E402
from xferkit.io.files import atomic_write_bytes  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Write *fig* as a PNG atomically (a full disk is a clear error, never half a file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes,
           yticklabels=classes, xlabel="predicted", ylabel="true", title="Confusion matrix")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                color="white" if value > threshold else "black")
    return save_figure(fig, path)


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """One reliability curve per name: accuracy against confidence, the diagonal is perfect."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for name, (y_true, proba) in curves.items():
        bins = [(c, a) for c, a, n in reliability_bins(y_true, proba) if n]
        ax.plot(*zip(*bins, strict=True), "o-", label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title="Reliability diagram")
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def plot_accuracy_vs_time(points: dict[str, tuple[float, float]], path: Path) -> Path:
    """Test accuracy against fit time (log scale), one labelled point per head."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (seconds, accuracy) in points.items():
        ax.scatter(seconds, accuracy, s=40)
        ax.annotate(name, (seconds, accuracy), textcoords="offset points", xytext=(5, 4))
    ax.set(xscale="log", xlabel="fit time (s, log scale)", ylabel="test accuracy", ylim=(0, 1.05),
           title="Accuracy against fit time")
    _plain_log_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _plain_log_ticks(axis) -> None:
    """Label a log axis 20, 30, 50 rather than 2x10^1."""
    from matplotlib.ticker import FuncFormatter

    label = FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_formatter(label)
    axis.set_minor_formatter(label)


def plot_learning_curve(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Test accuracy against training examples per class: how data-efficient each head is."""
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, points in curves.items():
        ax.plot(*zip(*points, strict=True), "o-", label=name)
    ax.set(xscale="log", xlabel="training examples per class (log scale)", ylabel="test accuracy",
           ylim=(0, 1.05), title="Learning curve")
    ax.set_xticks(sorted({k for points in curves.values() for k, _ in points}))
    ax.xaxis.set_minor_locator(NullLocator())
    _plain_log_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_best_so_far(values: list[float], baseline: float | None, path: Path) -> Path:
    """The best validation NLL after each trial of a tune, against the head's defaults."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.step(range(1, len(values) + 1), values, where="post", marker="o", label="best so far")
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="default hyper-parameters")
    ax.set(xlabel="trials", ylabel="validation NLL", title="Bayesian optimisation")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return save_figure(fig, path)
