"""PNG figures (matplotlib, Agg backend): confusion matrix and reliability diagrams."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xferkit.metrics import reliability_bins  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


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
