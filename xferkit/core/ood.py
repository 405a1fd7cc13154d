"""Out-of-distribution scores and how well they separate: distance to class means, AUROC, thresholds.

The distance is a diagonal Mahalanobis distance (Lee et al., 2018, with a per-feature pooled
within-class variance instead of a full covariance, which a few hundred images cannot estimate in
hundreds of dimensions) from an image's features to the nearest class mean. Softmax scores stay
confident far from the data; this one grows there. A score is flagged above the held-out scores'
finite-sample ``1 - rate`` quantile, so at most ``rate`` of in-distribution images are flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from xferkit.core.conformal import finite_sample_quantile

#: A feature's pooled standard deviation is at least this fraction of the median non-zero one (constant
#: features: dead ReLU units are often most of them).
MIN_RELATIVE_STD = 1e-3


@dataclass(frozen=True)
class ClassMeans:
    """Each class's mean feature vector ``(classes, d)`` and the pooled within-class deviation ``(d,)``."""

    means: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, n_classes: int) -> ClassMeans:
        """Class means and pooled within-class deviations of features *X* with class indices *y*."""
        X = np.asarray(X, dtype=np.float64)
        means = np.stack([X[y == c].mean(axis=0) for c in range(n_classes)])
        return cls.of(means, np.sqrt(((X - means[y]) ** 2).mean(axis=0)))

    @classmethod
    def of(cls, means: np.ndarray, std: np.ndarray) -> ClassMeans:
        """From class means and pooled deviations, constant features' deviations raised to a floor."""
        varying = std[std > 0]
        floor = MIN_RELATIVE_STD * (float(np.median(varying)) if len(varying) else 1.0)
        return cls(means.astype(np.float32), np.maximum(std, floor).astype(np.float32))

    def distance(self, X: np.ndarray) -> np.ndarray:
        """The mean squared standardised distance of each row of *X* to the nearest class mean."""
        Z = np.asarray(X, dtype=np.float64) / self.std
        centres = self.means.astype(np.float64) / self.std
        squared = (Z ** 2).sum(1)[:, None] - 2 * Z @ centres.T + (centres ** 2).sum(1)[None, :]
        return np.maximum(squared.min(axis=1), 0.0) / Z.shape[1]


def ood_threshold(sorted_scores: np.ndarray, rate: float) -> float:
    """The score above which an image is flagged, for at most *rate* false alarms on in-distribution data."""
    return finite_sample_quantile(sorted_scores, 1.0 - rate, f"--ood-rate {rate:g}")


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The chance that an out-of-distribution score exceeds an in-distribution one (ties count half)."""
    ranks = rankdata(np.concatenate([inside, outside]))[len(inside):]
    m = len(outside)
    return float((ranks.sum() - m * (m + 1) / 2) / (m * len(inside)))
