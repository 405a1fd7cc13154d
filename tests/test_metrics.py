"""Metrics against values worked out by hand and against scikit-learn and torchmetrics as oracles."""

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, f1_score, log_loss
from torchmetrics.functional.classification import multiclass_calibration_error

from xferkit.core.metrics import (
    ECE_BINS,
    brier_score,
    classification_metrics,
    expected_calibration_error,
)


def random_predictions(n=500, k=4, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, k))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in proba])  # labels drawn from softened predictions
    return y, proba


def test_perfect_confident_predictions():
    y = np.array([0, 1, 2, 1])
    proba = np.eye(3)[y]
    m = classification_metrics(y, proba)
    assert m["accuracy"] == m["macro_f1"] == 1.0
    assert m["ece"] == pytest.approx(0.0) and m["brier"] == pytest.approx(0.0)
    assert m["nll"] < 1e-6 and "top2_accuracy" in m


def test_ece_is_confidence_accuracy_gap():
    # All predictions at confidence 0.8, but only half correct: ECE = |0.5 - 0.8| = 0.3.
    proba = np.array([[0.8, 0.2]] * 4)
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(y, proba) == pytest.approx(0.3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nll_and_macro_f1_match_scikit_learn(seed):
    y, proba = random_predictions(seed=seed)
    m = classification_metrics(y, proba)
    assert m["nll"] == pytest.approx(log_loss(y, proba, labels=range(4)), rel=1e-9)
    assert m["macro_f1"] == pytest.approx(f1_score(y, proba.argmax(1), average="macro"), rel=1e-12)


def test_macro_f1_averages_the_classes_that_occur_like_scikit_learn():
    y = np.array([0, 0, 1, 1])  # class 2 never occurs and is never predicted
    proba = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    assert classification_metrics(y, proba)["macro_f1"] == pytest.approx(
        f1_score(y, proba.argmax(1), average="macro"))


def test_brier_matches_scikit_learn_for_two_classes():
    y, proba = random_predictions(k=2, seed=3)
    # scikit-learn's binary Brier score is the squared error of p(class 1); ours sums both columns: 2x.
    assert brier_score(y, proba) == pytest.approx(2 * brier_score_loss(y, proba[:, 1]), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 4])
def test_ece_matches_torchmetrics(seed):
    y, proba = random_predictions(seed=seed)
    expected = multiclass_calibration_error(torch.from_numpy(proba).float(), torch.from_numpy(y),
                                            num_classes=4, n_bins=ECE_BINS, norm="l1").item()
    assert expected_calibration_error(y, proba) == pytest.approx(expected, abs=1e-6)
