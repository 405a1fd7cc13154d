"""Split conformal prediction sets with the adaptive prediction set (APS) score of Romano et al. (2020).

A label's score is the probability mass of the labels ranked above it (APS without randomisation,
the ``u = 0`` end): the most probable label scores 0, so no set is empty, and where the model is
right less often than the coverage asked, the scores above 0 are continuous and coverage is exact,
between ``1 - a`` and ``1 - a + 1 / (n + 1)``. Held-out scores,
kept sorted, give at any coverage ``1 - a`` the threshold (their ``ceil((n + 1)(1 - a))``-th
smallest) under which the true label's score falls with probability at least ``1 - a`` for a new
image exchangeable with them. Written here rather than taken from MAPIE: the method is these few
lines on probabilities the model already calibrates, and MAPIE would refit estimators it does not own.
"""

from __future__ import annotations

import math

import numpy as np

from xferkit.core.errors import XferkitError


def aps_scores(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The score of each row's true label *y* (column indices): the mass of the labels ranked above it."""
    true = proba[np.arange(len(y)), y]
    return np.where(proba > true[:, None], proba, 0.0).sum(axis=1)


def needed_held_out(level: float) -> int:
    """The fewest held-out scores for which a ``level`` quantile exists: ``ceil((n + 1) level) <= n``."""
    return math.ceil(level / (1.0 - level) - 1e-9)


def finite_sample_quantile(sorted_scores: np.ndarray, level: float, asked: str) -> float:
    """The ``ceil((n + 1) level)``-th smallest of *sorted_scores*; a set too small for *level* is refused.

    A new exchangeable score is at most that value with probability at least *level*; *asked* names
    the option that chose the level, for the message.
    """
    n = len(sorted_scores)
    if not 0.0 < level < 1.0:
        raise XferkitError(f"{asked} is out of range: it must lie strictly between 0 and 1.")
    rank = math.ceil((n + 1) * level - 1e-9)
    if rank > n:
        raise XferkitError(f"{asked} needs at least {needed_held_out(level)} held-out images; this model was "
                           f"calibrated on {n}. Ask for less, or repurpose with more validation images "
                           "(--val-split, or a larger val/ folder).")
    return float(sorted_scores[rank - 1])


def prediction_sets(proba: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean ``(n, classes)``: the labels whose APS score is within *threshold* (a held-out quantile).

    They are the most probable labels, taken until their mass passes the threshold.
    """
    order = np.argsort(-proba, axis=1, kind="stable")
    ranked = np.take_along_axis(proba, order, axis=1)
    above = np.concatenate([np.zeros((len(proba), 1)), np.cumsum(ranked, axis=1)[:, :-1]], axis=1)
    sets = np.zeros(proba.shape, dtype=bool)
    np.put_along_axis(sets, order, above <= threshold, axis=1)
    return sets
