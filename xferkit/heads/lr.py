"""Logistic regression on standardised features: the strong, cheap default head.

Both solvers minimise scikit-learn's objective (mean log-loss plus ``||W||^2 / (2 C n)``, the
intercept unpenalised) to the same precision: scikit-learn's L-BFGS for small problems, and for
large ones a batched, preconditioned L-BFGS in torch (:mod:`xferkit.heads._lbfgs`) that fits every
C of the grid at once, on the GPU when there is one. scikit-learn's default ``tol=1e-4`` stops far
from the optimum on correlated CNN features (a small gradient is not a small error there), so it
runs with ``tol=1e-6``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from numbers import Integral, Real

import numpy as np
import torch
from scipy.special import expit, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from xferkit.core.devices import resolve_device
from xferkit.core.distributed import all_gather_objects, all_reduce_sum, rank
from xferkit.core.errors import InvalidParameter
from xferkit.heads._lbfgs import CHUNK_ROWS, lbfgs_multinomial, row_moments, standardised_chunks
from xferkit.heads.base import CONSTANT_STD, ArraySpec, FeatureHead, ProgressCallback, stratified_holdout
from xferkit.heads.exportable import Standardised, constant

#: Regularisation strengths tried on the held-out part when ``C`` is not given.
C_GRID = tuple(10.0 ** k for k in range(-4, 3))
#: The C used when ``C=None`` but X is too small to hold any example out (scikit-learn's default).
FALLBACK_C = 1.0
#: Multiply-adds per pass (samples x features x classes) from which torch is used, and the GPU:
#: below them scikit-learn, then the CPU, are as fast (measured at 5000x512x10 and 50000x2048x20;
#: at 400x1280x10, sample_data's size, scikit-learn fitted the C grid in 2.3 s against 11.8 s).
TORCH_MIN_WORK, GPU_MIN_WORK = 2 * 10**7, 10**8
SOLVERS = ("auto", "torch", "sklearn")
SKLEARN_TOL = 1e-6  # scikit-learn's own test is the gradient alone: a tighter one reaches as far
#: A solver's result for a list of C: coefficients and intercepts per C, and the most iterations taken.
Solution = tuple[list[np.ndarray], list[np.ndarray], int]


class LogisticHead(FeatureHead):
    """Multinomial logistic regression on standardised features; ``C=None`` chooses C by held-out NLL.

    Parameters
    ----------
    C : float or None, default=None
        Inverse regularisation strength; None picks it from C_GRID by NLL on a held-out part of X.
    validation_fraction : float, default=0.2
        Share of each class held out to choose C when C is None (then refitted on all of X).
    max_iter : int, default=1000
        Most L-BFGS iterations per fit.
    solver : {"auto", "torch", "sklearn"}, default="auto"
        The L-BFGS to run; auto picks torch for large problems and scikit-learn for small ones.
    device : str, default="auto"
        Where the torch solver runs (auto, cpu, cuda or cuda:N); auto uses CUDA for large problems.
    random_state : int or None, default=None
        Seed of the held-out split that chooses C.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels seen in fit, in the order of predict_proba's columns.
    n_features_in_ : int
        Number of features seen in fit.
    mean_, scale_ : ndarray of shape (n_features_in_,)
        Per-feature mean and standard deviation used to standardise X.
    coef_ : ndarray of shape (1, n_features_in_) for two classes, else (n_classes, n_features_in_)
        Weights on the standardised features (two classes: for the second class against the first).
    intercept_ : ndarray of shape (1,) for two classes, else (n_classes,)
        Intercepts of the decision function.
    C_ : float
        The regularisation strength of the final fit.
    solver_ : str
        The solver that ran: torch or sklearn.
    n_iter_ : int
        L-BFGS iterations of the final fit.
    """

    name = "lr"
    _parameter_constraints = {
        "C": [Interval(Real, 0, None, closed="neither"), None],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "max_iter": [Interval(Integral, 1, 100_000, closed="both")],
        "solver": [StrOptions(set(SOLVERS))],
        "device": [str],
        "random_state": ["random_state"],
    }
    _fitted_scalars = {
        "C_": [Interval(Real, 0, None, closed="neither")],
        "solver_": [StrOptions({"torch", "sklearn"})],
        "n_iter_": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, C: float | None = None, *, validation_fraction: float = 0.2, max_iter: int = 1000,
                 solver: str = "auto", device: str = "auto", random_state: int | None = None):
        self.C = C
        self.validation_fraction = validation_fraction
        self.max_iter = max_iter
        self.solver = solver
        self.device = device
        self.random_state = random_state

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"C": trial.suggest_float("C", 1e-4, 1e2, log=True)}

    def _fit(self, X: np.ndarray, y: np.ndarray, progress: ProgressCallback) -> None:
        self._check_C_choice()
        Xs = self._standardised(X, np.float32)
        solve = self._solver(work=Xs.shape[0] * Xs.shape[1] * len(self.classes_))

        def held_out_nll(held_out: np.ndarray, coefs: list, intercepts: list) -> np.ndarray:
            return _summed_nll(Xs[held_out], y[held_out], coefs, intercepts, len(self.classes_))
        self._fit_choosing_C(y, lambda rows, Cs: solve(_rows(Xs, rows), _rows(y, rows), Cs), held_out_nll,
                             progress)

    def fit_streamed(self, X, y, *, chunk_rows: int = CHUNK_ROWS, sharded: bool = False,
                     progress: ProgressCallback | None = None) -> LogisticHead:
        """Fit on rows read a chunk at a time with the torch solver: memory O(chunk), not O(X).

        *X* may be a memory-mapped array larger than memory (``np.load(path, mmap_mode="r")``);
        standardisation happens chunk by chunk. ``sharded``: under torchrun each rank passes its own
        rows (rank order being row order), and every rank gets the head that ``fit`` would give on all
        of them. ``C=None`` holds out the rows ``fit`` would (the split is made of every rank's class
        indices, gathered: 4 bytes a row), fits every C of C_GRID on the other rows at once, keeps the
        one whose held-out NLL, summed over the ranks, is lowest, and refits it on all rows.
        """
        try:
            self._validate_params()
        except InvalidParameterError as err:
            raise InvalidParameter(str(err)) from None
        self._check_C_choice()
        y = np.asarray(y)
        labels = np.concatenate(all_gather_objects(np.unique(y))) if sharded else y
        self.classes_, self.n_features_in_ = np.unique(labels), X.shape[1]
        y = np.searchsorted(self.classes_, y)
        self.mean_, std = row_moments(X, chunk_rows, sharded)
        self.scale_ = np.where(std <= CONSTANT_STD * np.abs(self.mean_) + np.finfo(np.float64).tiny, 1.0, std)
        self.solver_ = "torch"
        solve = partial(_fit_torch, X, n_classes=len(self.classes_), max_iter=self.max_iter,
                        device=self._device(X.shape[0] * X.shape[1] * len(self.classes_)), shift=self.mean_,
                        scale=self.scale_, chunk_rows=chunk_rows, sharded=sharded)

        def held_out_nll(held_out: np.ndarray, coefs: list, intercepts: list) -> np.ndarray:
            y_held, total = y[held_out], np.zeros(len(coefs))
            for start, rows in standardised_chunks(X, self.mean_, self.scale_, chunk_rows, held_out):
                total += _summed_nll(rows.numpy(), y_held[start:start + len(rows)], coefs, intercepts,
                                     len(self.classes_))
            return total
        self._fit_choosing_C(y, lambda rows, Cs: solve(_rows(y, rows), Cs, subset=rows), held_out_nll,
                             progress or (lambda *_: None), sharded)
        return self

    def _check_C_choice(self) -> None:
        if self.C is None and self.validation_fraction == 0:
            raise InvalidParameter("C=None chooses C on a held-out part of X: give validation_fraction > 0, "
                                   "or a number for C.")

    def _fit_choosing_C(self, y: np.ndarray, solve_rows: Callable[[np.ndarray, list[float]], Solution],
                        held_out_nll: Callable[[np.ndarray, list, list], np.ndarray],
                        progress: ProgressCallback, sharded: bool = False) -> None:
        """Set ``C_`` (given, or chosen on held-out rows), then fit it on all rows.

        ``solve_rows(rows, Cs)`` fits every C on the rows at positions *rows* (None: all of them);
        ``held_out_nll(rows, coefs, intercepts)`` sums each fit's NLL on *rows*. ``sharded``: *y* is this
        rank's part of the rows.
        """
        if self.C is not None:
            self.C_ = float(self.C)
        else:
            self.C_ = self._choose_C(y, solve_rows, held_out_nll, progress, sharded)
        (self.coef_,), (self.intercept_,), self.n_iter_ = solve_rows(None, [self.C_])
        steps = 1 if self.C is not None else 2
        progress(steps, steps, f"C={self.C_:g}, {self.n_iter_} iterations")

    def _solver(self, work: int) -> Callable[[np.ndarray, np.ndarray, list[float]], Solution]:
        """``solve(Xs, y, Cs)`` for a problem of *work* multiply-adds per pass; sets ``solver_``."""
        self.solver_ = self.solver
        if self.solver == "auto":
            self.solver_ = "torch" if work >= TORCH_MIN_WORK else "sklearn"
        return partial(_fit_torch if self.solver_ == "torch" else _fit_sklearn, n_classes=len(self.classes_),
                       max_iter=self.max_iter, device=self._device(work))

    def _device(self, work: int) -> torch.device:
        """Where the torch solver runs a problem of *work* multiply-adds per pass."""
        return resolve_device("cpu" if self.device == "auto" and work < GPU_MIN_WORK else self.device)

    def _choose_C(self, y: np.ndarray, solve_rows, held_out_nll, progress: ProgressCallback,
                  sharded: bool) -> float:
        """The C of C_GRID whose fit on the kept part has the lowest NLL on the held-out part.

        ``sharded``: the split is the one of every rank's rows together, and the NLL sums are all-reduced.
        """
        kept, held_out, n_held_out = _own_split(y, self.validation_fraction, self.random_state, sharded)
        if not n_held_out:
            progress(1, 2, f"C={FALLBACK_C:g}: too few examples to hold any out")
            return FALLBACK_C
        coefs, intercepts, _ = solve_rows(kept, list(C_GRID))
        nll = torch.from_numpy(held_out_nll(held_out, coefs, intercepts))
        nll = (all_reduce_sum(nll) if sharded else nll).numpy() / n_held_out
        best = int(np.argmin(nll))
        progress(1, 2, f"C={C_GRID[best]:g}, held-out NLL {nll[best]:.3f}")
        return C_GRID[best]

    def decision_function(self, X) -> np.ndarray:
        """Logits of the classes: ``(n,)`` for two classes (> 0: the second one), else ``(n, n_classes)``."""
        return _decision(self._standardised(self._validated(X)), self.coef_, self.intercept_)

    def predict_proba(self, X) -> np.ndarray:
        return _probabilities(self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        """The label whose logit is largest (two classes: the second where the decision is positive)."""
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)]

    def torch_modules(self) -> dict[str, nn.Module]:
        """The exact model: standardise, logits, logistic function or softmax."""
        check_is_fitted(self)
        logistic = _LogisticProbabilities(self.coef_, self.intercept_)
        return {"exact": Standardised(self.mean_, self.scale_, logistic)}

    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef_, "intercept": self.intercept_}

    def _array_specs(self, arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        """``coef`` and ``intercept`` in float64: one row for two classes, else one a class."""
        rows = 1 if len(self.classes_) == 2 else len(self.classes_)
        return {"coef": ArraySpec((rows, self.n_features_in_)), "intercept": ArraySpec((rows,))}

    def _restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.coef_, self.intercept_ = arrays["coef"], arrays["intercept"]


def _own_split(y: np.ndarray, fraction: float, random_state, sharded: bool
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """This rank's positions (kept, held out) in the stratified split of every rank's class indices *y*,
    and how many are held out in all: the split ``fit`` makes of all the rows at once."""
    parts = all_gather_objects(y.astype(np.int32)) if sharded else [y]
    start = sum(len(part) for part in parts[:rank()]) if sharded else 0
    kept, held_out = stratified_holdout(np.concatenate(parts), fraction, random_state)

    def own(index: np.ndarray) -> np.ndarray:
        return index[(index >= start) & (index < start + len(y))] - start
    return own(kept), own(held_out), len(held_out)


def _rows(a: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The rows of *a* at positions *rows*, or *a* itself for None (no copy)."""
    return a if rows is None else a[rows]


def _summed_nll(Xs: np.ndarray, y: np.ndarray, coefs: list, intercepts: list, n_classes: int) -> np.ndarray:
    """Each fit's log-loss on rows *Xs* with class indices *y*, summed over the rows."""
    labels = np.arange(n_classes)
    return np.array([log_loss(y, _probabilities(_decision(Xs, coef, intercept)), labels=labels,
                              normalize=False) for coef, intercept in zip(coefs, intercepts, strict=True)])


def _decision(Xs: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """``Xs @ coef.T + intercept``, one column (two classes) as a 1-D array."""
    scores = Xs @ coef.T + intercept
    return scores[:, 0] if scores.shape[1] == 1 else scores


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """Class probabilities from :func:`_decision`'s logits (the logistic function for two classes)."""
    if scores.ndim == 1:
        positive = expit(scores)
        return np.column_stack([1 - positive, positive])
    return softmax(scores, axis=1)


class _LogisticProbabilities(nn.Module):
    """:func:`_probabilities` of :func:`_decision` in torch, on standardised features."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray):
        super().__init__()
        self.register_buffer("coef", constant(coef))
        self.register_buffer("intercept", constant(intercept))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scores = z @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # two classes: the logistic function of the second one's logit
            positive = torch.sigmoid(scores)
            return torch.cat([1 - positive, positive], dim=1)
        return torch.softmax(scores, dim=1)


def _fit_sklearn(Xs: np.ndarray, y: np.ndarray, Cs: list[float], n_classes: int, max_iter: int,
                 device: torch.device) -> Solution:
    """One scikit-learn fit per C: coefficients, intercepts (float64) and the most iterations."""
    coefs, intercepts, n_iter = [], [], 0
    for C in Cs:
        model = LogisticRegression(C=C, max_iter=max_iter, tol=SKLEARN_TOL).fit(Xs, y)
        coefs.append(model.coef_.astype(np.float64))
        intercepts.append(model.intercept_.astype(np.float64))
        n_iter = max(n_iter, int(model.n_iter_.max()))
    return coefs, intercepts, n_iter


def _fit_torch(Xs: np.ndarray, y: np.ndarray, Cs: list[float], n_classes: int, max_iter: int,
               device: torch.device, **streamed) -> Solution:
    """Every C in one batched torch solve, shaped like scikit-learn's result.

    ``streamed`` (``lbfgs_multinomial``'s ``shift``, ``scale``, ``chunk_rows``, ``sharded``): *Xs* stays
    where it is (a memory map, say) and is read a chunk at a time, else it is moved to *device* whole.
    """
    X = Xs if streamed else torch.from_numpy(Xs).to(device)
    # Two classes: scikit-learn's binary model with C equals the symmetric softmax one with C / 2.
    Cs_eff = [C / 2 if n_classes == 2 else C for C in Cs]
    W, n_iter = lbfgs_multinomial(X, torch.from_numpy(y).to(device), n_classes, Cs_eff, max_iter,
                                  device=device, **streamed)
    coefs, intercepts = [], []
    for w in W.cpu().double().numpy():  # (d + 1, k): weights, then the intercept row
        if n_classes == 2:  # the symmetric pair as scikit-learn's one row: class 1 against class 0
            w = w[:, 1:] - w[:, :1]
        coefs.append(w[:-1].T.copy())
        intercepts.append(w[-1].copy())
    return coefs, intercepts, n_iter
