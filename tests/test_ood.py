"""Out-of-distribution flags: far-away points flagged, in-distribution ones at about the rate, per head."""

import math

import numpy as np
import pytest
from conftest import separable_features
from sklearn.metrics import roc_auc_score

from xferkit.core.ood import ClassMeans, auroc, ood_threshold
from xferkit.model.held_out import DEFAULT_OOD_SCORE, OOD_SCORES, HeldOut
from xferkit.model.registry import create_head

RATE = 0.05


def problem(seed: int = 0):
    """Train / held-out / test blobs of one distribution, and points far from all of them."""
    X, y = separable_features(n_per_class=140, dim=8, seed=seed, spread=1.0)
    far = np.random.default_rng(seed + 1).normal(0, 1, (100, 8)) * 4 + 40
    return (X[:120], y[:120]), (X[120:270], y[120:270]), X[270:], far.astype(np.float32)


def test_far_points_are_flagged_and_in_distribution_ones_at_about_the_rate_by_distance():
    (X, y), (X_val, _), X_test, far = problem()
    means = ClassMeans.fit(X, y, 3)
    threshold = ood_threshold(np.sort(means.distance(X_val)), RATE)
    assert (means.distance(far) > threshold).mean() >= 0.9
    flagged = (means.distance(X_test) > threshold).mean()
    assert flagged <= RATE + 3 * math.sqrt(RATE * (1 - RATE) / len(X_test))


def test_distance_stays_finite_when_most_features_are_constant():
    """Dead ReLU units: a median deviation of 0 once gave constant features a floor of 0 (inf distances)."""
    (X, y), (X_val, _), _, far = problem()
    dead = np.zeros((len(X), 12), dtype=np.float32)
    means = ClassMeans.fit(np.hstack([X, dead]), y, 3)
    assert (means.std > 0).all()
    inside = means.distance(np.hstack([X_val, np.zeros((len(X_val), 12), dtype=np.float32)]))
    outside = means.distance(np.hstack([far, np.ones((len(far), 12), dtype=np.float32)]))
    assert np.isfinite(inside).all() and np.isfinite(outside).all() and outside.min() > inside.max()


@pytest.mark.parametrize("head", ["lr", pytest.param("gp", marks=pytest.mark.slow), "bnn"])
def test_each_heads_ood_score_flags_far_points(head):
    """The score each head is assigned (its own uncertainty, or the distance) through the held-out record."""
    (X, y), (X_val, y_val), X_test, far = problem(1)
    params = {"bnn": {"epochs": 30}, "lr": {"C": 1.0}}.get(head, {})
    estimator = create_head(head, random_state=0, **params).fit(X, y)
    means = ClassMeans.fit(X, y, 3)

    def scores(Z):
        return {**estimator.uncertainty(Z), "distance": means.distance(Z)}

    held = HeldOut.of(estimator.predict_proba(X_val), y_val, scores(X_val), head, "validation split")
    assert held.ood_score == OOD_SCORES.get(head, DEFAULT_OOD_SCORE)
    threshold = held.threshold(RATE)
    assert (scores(far)[held.ood_score] > threshold).mean() >= 0.9
    assert (scores(X_test)[held.ood_score] > threshold).mean() <= 0.2


def test_the_rate_is_honoured_over_many_splits():
    """The finite-sample threshold: the mean false-alarm rate over random splits is at most the rate."""
    rng, rates = np.random.default_rng(3), []
    for _ in range(200):
        scores = rng.gamma(2.0, size=200)
        rates.append((scores[100:] > ood_threshold(np.sort(scores[:100]), RATE)).mean())
    tolerance = 4 * math.sqrt(RATE * (1 - RATE) / (100 * 200) + RATE * (1 - RATE) / (102 * 200))
    assert RATE - 1 / 101 - tolerance < np.mean(rates) <= RATE + tolerance


def test_auroc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    inside, outside = rng.integers(0, 5, 50).astype(float), rng.integers(2, 8, 30).astype(float)
    expected = roc_auc_score(np.r_[np.zeros(50), np.ones(30)], np.r_[inside, outside])
    assert auroc(inside, outside) == pytest.approx(expected)
