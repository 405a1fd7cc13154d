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
    """Accuracy against confidence per name (the diagonal is perfect), with how many images each bin holds.

    A marker's area follows its bin's count and the lower panel shows the counts, so a bin of three
    images cannot pass for evidence; the legend sits below the axes, where it hides no point.
    """
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 6.2), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for name, (y_true, proba) in curves.items():
        bins = np.array([(c, a, n) for c, a, n in reliability_bins(y_true, proba) if n], dtype=float)
        line, = ax.plot(bins[:, 0], bins[:, 1], "-", lw=1.2, label=f"{name} (n={len(y_true)})")
        ax.scatter(bins[:, 0], bins[:, 1], s=12 + 150 * np.sqrt(bins[:, 2] / bins[:, 2].max()),
                   color=line.get_color(), alpha=0.8, edgecolors="white", linewidths=0.5)
        counts.plot(bins[:, 0], bins[:, 2], "o-", ms=3, lw=1, color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy", title="Reliability diagram (marker area: images)")
    counts.set(xlabel="confidence", ylabel="images", yscale="log")
    ax.grid(alpha=0.3)
    counts.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=2, frameon=False)
    return save_figure(fig, path)


def plot_accuracy_vs_time(points: dict[str, tuple[float, float]], path: Path) -> Path:
    """Test accuracy against fit time (log scale): one marker per head, named in a legend below.

    A legend rather than labels beside the points: heads that fit in similar times would
    print their names on top of each other.
    """
    fig, ax = plt.subplots(figsize=(5, 4))
    markers = "osD^vP*Xh"
    for k, (name, (seconds, accuracy)) in enumerate(points.items()):
        ax.scatter(seconds, accuracy, s=50, marker=markers[k % len(markers)], label=name, zorder=3)
    ax.set(xscale="log", xlabel="fit time (s, log scale)", ylabel="test accuracy", ylim=(0, 1.05),
           title="Accuracy against fit time")
    _plain_log_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(4, max(1, len(points))),
              frameon=False)
    return save_figure(fig, path)


def _plain_log_ticks(axis) -> None:
    """Label a log axis 1, 2, 5, 10, 20, 50 (not 2x10^1; over more than two decades 1, 10, 100), never every
    minor tick: labels must not collide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = axis.get_view_interval()
    decades = np.log10(max(high, 1e-12) / max(low, 1e-12))
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_learning_curve(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Test accuracy against training examples per class: how data-efficient each head is."""
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, points in curves.items():
        ax.plot(*zip(*points, strict=True), "o-", label=name)
    ax.set(xscale="log", xlabel="training examples per class (log scale)", ylabel="test accuracy",
           ylim=(0, 1.05), title="Learning curve")
    _plain_log_ticks(ax.xaxis)
    ax.set_xticks(sorted({k for points in curves.values() for k, _ in points}))
    ax.xaxis.set_minor_locator(NullLocator())
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
