"""Classification metrics that matter for a repurposed model: accuracy and calibration.

Labels are column indices of ``proba``. Macro-F1 follows scikit-learn: the mean over the classes
that occur in the true or the predicted labels.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

ECE_BINS = 15


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, top-k accuracy (k=5, or fewer classes), macro-F1, NLL, ECE and Brier score."""
    y_true = np.asarray(y_true)
    n_classes = proba.shape[1]
    y_pred = proba.argmax(axis=1)
    metrics = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "nll": negative_log_likelihood(y_true, proba),
        "ece": expected_calibration_error(y_true, proba),
        "brier": brier_score(y_true, proba),
    }
    k = min(5, n_classes - 1)
    if k > 1:
        metrics[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, proba, k=k,
                                                                 labels=np.arange(n_classes)))
    return metrics


def negative_log_likelihood(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-probability of the true class (log-loss)."""
    return float(log_loss(y_true, proba, labels=np.arange(proba.shape[1])))


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS
                               ) -> float:
    """Weighted mean gap between confidence and accuracy over equal-width confidence bins."""
    bins = reliability_bins(y_true, proba, n_bins)
    n = max(1, len(y_true))
    return float(sum(count / n * abs(acc - conf) for conf, acc, count in bins if count))


def reliability_bins(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS
                     ) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per equal-width confidence bin."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true)
    which = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        out.append((float(confidence[mask].mean()) if count else (b + 0.5) / n_bins,
                    float(correct[mask].mean()) if count else 0.0, count))
    return out


def brier_score(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean over examples of the squared distance between probabilities and the one-hot label."""
    onehot = np.eye(proba.shape[1])[np.asarray(y_true)]
    return float(((proba - onehot) ** 2).sum(axis=1).mean())


def predictive_entropy(proba: np.ndarray) -> np.ndarray:
    """Entropy of each row of *proba*, in nats."""
    return -(proba * np.log(np.clip(proba, 1e-12, 1.0))).sum(axis=1)


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict]:
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(classes)), zero_division=0)
    return [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f),
             "support": int(s)} for name, p, r, f, s in zip(classes, precision, recall, f1, support,
                                                           strict=True)]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))
