"""Temperature scaling: one shared calibration step for every head, fitted on held-out predictions.

A temperature ``T`` rescales log-probabilities (``p ** (1 / T)``, renormalised): ``T > 1`` softens
an over-confident model, ``T < 1`` sharpens an under-confident one, and no prediction changes class.
``T`` is the most probable value given held-out labels under a log-normal prior centred on 1, so
a held-out set that is all right cannot drive it to certainty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from xferkit.core.metrics import expected_calibration_error, negative_log_likelihood

#: Range searched for the temperature, and the standard deviation of its log-normal prior.
TEMPERATURE_RANGE, TEMPERATURE_PRIOR_STD = (1e-2, 1e2), 1.0


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The most probable temperature for probabilities *proba* of labels *y* (column indices)."""
    log_p, rows = np.log(np.clip(proba, 1e-12, 1.0)), np.arange(len(y))

    def negative_log_posterior(log_t: float) -> float:
        nll = -log_softmax(log_p / np.exp(log_t), axis=1)[rows, y].sum()
        return nll + 0.5 * (log_t / TEMPERATURE_PRIOR_STD) ** 2
    result = minimize_scalar(negative_log_posterior, bounds=np.log(TEMPERATURE_RANGE), method="bounded")
    return float(np.exp(result.x))


def temper(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities proportional to ``proba ** (1 / T)``: sharper for ``T < 1``, same ranking of classes."""
    if temperature == 1.0 or not len(proba):
        return proba
    return softmax(np.log(np.clip(proba, 1e-12, 1.0)) / temperature, axis=1).astype(proba.dtype)


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature with the held-out NLL and ECE it was judged on, before and after."""

    temperature: float
    n: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    def to_json(self) -> dict:
        return asdict(self)


def calibrate(proba: np.ndarray, y: np.ndarray) -> Calibration:
    """Fit a temperature on held-out *proba* (labels *y* as column indices) and report its effect."""
    temperature = fit_temperature(proba, y)
    after = temper(proba, temperature)
    return Calibration(temperature, int(len(y)), negative_log_likelihood(y, proba),
                       negative_log_likelihood(y, after), expected_calibration_error(y, proba),
                       expected_calibration_error(y, after))
