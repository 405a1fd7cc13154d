"""Metrics against values worked out by hand."""

import numpy as np
import pytest

from xferkit.metrics import brier_score, classification_metrics, expected_calibration_error


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


def test_brier_and_nll_by_hand():
    proba = np.array([[0.7, 0.3], [0.4, 0.6]])
    y = np.array([0, 0])
    assert brier_score(y, proba) == pytest.approx(((0.3**2 + 0.3**2) + (0.6**2 + 0.6**2)) / 2)
    m = classification_metrics(y, proba)
    assert m["nll"] == pytest.approx(-(np.log(0.7) + np.log(0.4)) / 2)
    assert m["accuracy"] == 0.5
