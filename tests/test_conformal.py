"""Conformal prediction sets (APS): the coverage guarantee over random splits, the sets' shape, refusals."""

import math

import numpy as np
import pytest
from scipy.special import softmax

from xferkit.core.conformal import aps_scores, finite_sample_quantile, needed_held_out, prediction_sets
from xferkit.core.errors import XferkitError


def calibrated_problem(rng, n: int, classes: int = 10, spread: float = 2.0):
    """Probabilities that are the true posteriors, and labels drawn from them: exchangeable by design."""
    proba = softmax(rng.normal(0, spread, (n, classes)), axis=1)
    y = (proba.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return proba, y


def test_mean_coverage_over_random_splits_is_the_target_within_binomial_tolerance():
    """Split conformal: given the calibration set, coverage is Beta(k, n + 1 - k), k = ceil((n+1)(1-a))."""
    rng, splits, n, m, target = np.random.default_rng(0), 400, 100, 100, 0.9
    coverages, sizes = [], []
    for _ in range(splits):
        proba, y = calibrated_problem(rng, n + m)
        threshold = finite_sample_quantile(np.sort(aps_scores(proba[:n], y[:n])), target, "--coverage")
        sets = prediction_sets(proba[n:], threshold)
        coverages.append(sets[np.arange(m), y[n:]].mean())
        sizes.append(sets.sum(axis=1).mean())
    k = math.ceil((n + 1) * target)
    expected = k / (n + 1)  # between the target and target + 1 / (n + 1)
    beta_var = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
    tolerance = 4 * math.sqrt(beta_var / splits + expected * (1 - expected) / (splits * m))
    assert abs(np.mean(coverages) - expected) < tolerance
    assert 1 < np.mean(sizes) < 10  # adaptive: neither the top label alone nor every label


def test_sets_are_the_most_probable_labels_never_empty_and_grow_with_the_coverage():
    proba, y = calibrated_problem(np.random.default_rng(1), 300)
    scores = np.sort(aps_scores(proba[:200], y[:200]))
    small, large = (prediction_sets(proba[200:], finite_sample_quantile(scores, c, "--coverage"))
                    for c in (0.5, 0.95))
    assert small.sum(axis=1).min() >= 1 and (large >= small).all() and large.sum() > small.sum()
    ranked = np.take_along_axis(large, np.argsort(-proba[200:], axis=1), axis=1)
    assert (np.diff(ranked.astype(int), axis=1) <= 0).all()  # a prefix of the ranking: no gaps


def test_the_score_is_the_mass_ranked_above_the_true_label():
    proba = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    assert aps_scores(proba, np.array([2, 1])) == pytest.approx([0.8, 0.0])


def test_the_quantile_is_the_finite_sample_corrected_order_statistic():
    scores = np.arange(1, 20) / 20.0  # n = 19: ceil(20 * 0.9) = 18th smallest
    assert finite_sample_quantile(scores, 0.9, "--coverage 0.9") == scores[17]
    assert needed_held_out(0.9) == 9 and needed_held_out(0.95) == 19


def test_a_level_the_held_out_set_is_too_small_for_is_refused_with_the_fix():
    with pytest.raises(XferkitError, match=r"--coverage 0.9 needs at least 9 held-out images; this model was "
                                           r"calibrated on 8.*--val-split"):
        finite_sample_quantile(np.linspace(0, 1, 8), 0.9, "--coverage 0.9")
    with pytest.raises(XferkitError, match="strictly between 0 and 1"):
        finite_sample_quantile(np.linspace(0, 1, 50), 1.0, "--coverage 1")
