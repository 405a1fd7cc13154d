"""Plots that read well: no colliding tick labels, bin counts in reliability diagrams, visible legends."""

import numpy as np
import pytest

from xferkit.api import plots


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions build, drawn (so text has extents) instead of saved."""
    kept = []

    def keep(fig, path):
        fig.canvas.draw()
        kept.append(fig)
        return path
    monkeypatch.setattr(plots, "save_figure", keep)
    return kept


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("seconds", [(0.4, 0.5, 0.6, 300.0), (1.2, 1.5, 2.0, 60.0, 110.0), (3.0, 3000.0)])
def test_accuracy_vs_time_labels_never_collide(figures, tmp_path, seconds):
    points = {f"head{k}": (s, 0.8) for k, s in enumerate(seconds)}
    plots.plot_accuracy_vs_time(points, tmp_path / "a.png")
    fig = figures[0]
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    low, high = ax.get_xlim()
    ticks = ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
    labels = [t.get_window_extent(renderer) for t in ticks
              if t.get_text() and t.get_visible() and low <= t.get_position()[0] <= high]
    assert len(labels) >= 2
    assert not any(_overlap(a, b) for i, a in enumerate(labels) for b in labels[i + 1:])
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(points)
    assert not _overlap(legend.get_window_extent(renderer), ax.get_window_extent(renderer))


def test_reliability_shows_bin_counts_and_a_legend_outside_the_axes(figures, tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    proba = rng.dirichlet(np.ones(3), 200)
    plots.plot_reliability({"lr": (y, proba), "gp": (y, proba ** 2 / (proba ** 2).sum(1, keepdims=True))},
                           tmp_path / "r.png")
    fig = figures[0]
    curves, counts = fig.axes
    renderer = fig.canvas.get_renderer()
    for line in counts.get_lines():
        assert line.get_ydata().sum() == len(y)  # every image is counted in exactly one bin
    legend = fig.legends[0]
    assert {"lr (n=200)", "gp (n=200)", "perfectly calibrated"} <= {t.get_text() for t in legend.get_texts()}
    box = legend.get_window_extent(renderer)
    assert not _overlap(box, curves.get_window_extent(renderer))
    assert not _overlap(box, counts.get_window_extent(renderer))
