"""Logistic regression on standardised features: the strong, cheap default head."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from xferkit.heads.base import Head, check_positive

#: Regularisation strengths tried on the validation split when ``C`` is not given.
C_GRID = tuple(10.0 ** k for k in range(-4, 3))


class LogisticHead(Head):
    """Multinomial logistic regression; ``C=None`` picks C on the validation split by NLL."""

    name = "lr"

    def __init__(self, C: float | None = None, max_iter: int = 1000):
        self.C = C
        self.max_iter = max_iter

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"C": trial.suggest_float("C", 1e-4, 1e2, log=True)}

    def fit(self, X, y, X_val=None, y_val=None) -> LogisticHead:
        check_positive(C=self.C, max_iter=self.max_iter)
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
        self.classes_ = np.unique(y)
        self.scaler_ = StandardScaler().fit(X)
        Xs = self.scaler_.transform(X)
        if self.C is not None:
            self.C_ = float(self.C)
        elif X_val is not None and len(X_val):
            Xv = self.scaler_.transform(np.asarray(X_val, dtype=np.float32))
            scores = {C: self._val_nll(self._solve(Xs, y, C), Xv, y_val) for C in C_GRID}
            self.C_ = min(scores, key=scores.get)
        else:
            self.C_ = 1.0
        model = self._solve(Xs, y, self.C_)
        self.coef_, self.intercept_ = self._full_rank(model)
        return self

    def _solve(self, Xs: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
        return LogisticRegression(C=C, max_iter=self.max_iter).fit(Xs, y)

    def _val_nll(self, model: LogisticRegression, Xv: np.ndarray, y_val) -> float:
        return log_loss(y_val, model.predict_proba(Xv), labels=model.classes_)

    def _full_rank(self, model: LogisticRegression) -> tuple[np.ndarray, np.ndarray]:
        """One weight row per class, also for two classes (where scikit-learn keeps one)."""
        coef, intercept = model.coef_, model.intercept_
        if len(self.classes_) == 2 and coef.shape[0] == 1:
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        return coef.astype(np.float32), intercept.astype(np.float32)

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        Xs = self.scaler_.transform(np.asarray(X, dtype=np.float32))
        return Xs @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        logits = self.decision_function(X)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def _get_state(self) -> dict[str, torch.Tensor]:
        return {"coef": torch.from_numpy(self.coef_), "intercept": torch.from_numpy(self.intercept_),
                "mean": torch.from_numpy(self.scaler_.mean_),
                "scale": torch.from_numpy(self.scaler_.scale_)}

    def _set_state(self, state: dict[str, torch.Tensor], info: dict) -> None:
        self.coef_, self.intercept_ = state["coef"].numpy(), state["intercept"].numpy()
        self.scaler_ = StandardScaler()
        self.scaler_.mean_, self.scaler_.scale_ = state["mean"].numpy(), state["scale"].numpy()
        self.scaler_.var_ = self.scaler_.scale_ ** 2
        self.scaler_.n_features_in_ = len(self.scaler_.mean_)
        self.C_ = info["C"]

    def _get_info(self) -> dict:
        return {"C": self.C_}
