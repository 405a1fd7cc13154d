"""Logistic regression on standardised features: the strong, cheap default head.

Both solvers minimise scikit-learn's objective (mean log-loss plus ``||W||^2 / (2 C n)``, the
intercept unpenalised) to the same precision: scikit-learn's L-BFGS for small problems, and for
large ones a batched, preconditioned L-BFGS in torch that fits every C of the validation grid
at once, on the GPU when there is one. scikit-learn's default ``tol=1e-4`` stops far from the
optimum on correlated CNN features (a small gradient is not a small error there), so it runs
with ``tol=1e-6``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from xferkit.devices import resolve_device
from xferkit.errors import XferkitError
from xferkit.heads.base import Head, check_positive

#: Regularisation strengths tried on the validation split when ``C`` is not given.
C_GRID = tuple(10.0 ** k for k in range(-4, 3))
#: Multiply-adds per pass (samples x features x classes) from which torch is used, and the GPU:
#: below them scikit-learn, then the CPU, are as fast (measured at 5000x512x10 and 50000x2048x20;
#: at 400x1280x10, sample_data's size, scikit-learn fitted the C grid in 2.3 s against 11.8 s).
TORCH_MIN_WORK, GPU_MIN_WORK = 2 * 10**7, 10**8
SOLVERS = ("auto", "torch", "sklearn")
TOL = 1e-4  # largest gradient entry at the optimum found (scikit-learn's default)
FTOL = 1e-6  # decrease of the loss the next step predicts, relative to the loss
SKLEARN_TOL = 1e-6  # scikit-learn's own test is the gradient alone: a tighter one reaches as far


class LogisticHead(Head):
    """Multinomial logistic regression; ``C=None`` picks C on the validation split by NLL.

    ``solver="auto"`` uses torch for large problems and scikit-learn for small ones;
    ``device="auto"`` runs torch on CUDA when present and the problem is large enough.
    """

    name = "lr"

    def __init__(self, C: float | None = None, max_iter: int = 1000, solver: str = "auto",
                 device: str = "auto"):
        self.C = C
        self.max_iter = max_iter
        self.solver = solver
        self.device = device

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"C": trial.suggest_float("C", 1e-4, 1e2, log=True)}

    def fit(self, X, y, X_val=None, y_val=None) -> LogisticHead:
        check_positive(C=self.C, max_iter=self.max_iter)
        if self.solver not in SOLVERS:
            raise XferkitError(f"unknown solver {self.solver!r}; use one of {', '.join(SOLVERS)}.")
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
        self.classes_ = np.unique(y)
        self.scaler_ = StandardScaler().fit(X)
        Xs = self.scaler_.transform(X)
        validate = self.C is None and X_val is not None and len(X_val)
        Cs = [float(self.C)] if self.C is not None else list(C_GRID) if validate else [1.0]
        work = Xs.shape[0] * Xs.shape[1] * len(self.classes_)
        self.solver_ = self.solver
        if self.solver == "auto":
            self.solver_ = "torch" if work >= TORCH_MIN_WORK else "sklearn"
        fit = _fit_torch if self.solver_ == "torch" else _fit_sklearn
        device = resolve_device("cpu" if self.device == "auto" and work < GPU_MIN_WORK else self.device)
        coefs, intercepts, self.n_iter_ = fit(Xs, np.searchsorted(self.classes_, y), len(self.classes_),
                                              Cs, self.max_iter, device)
        best = 0
        if validate:
            Xv = self.scaler_.transform(np.asarray(X_val, dtype=np.float32))
            yv = np.searchsorted(self.classes_, np.asarray(y_val))
            labels = np.arange(len(self.classes_))
            nll = [log_loss(yv, _softmax(Xv @ w.T + b), labels=labels)
                   for w, b in zip(coefs, intercepts, strict=True)]
            best = int(np.argmin(nll))
        self.C_ = Cs[best]
        self.coef_, self.intercept_ = coefs[best], intercepts[best]
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        Xs = self.scaler_.transform(np.asarray(X, dtype=np.float32))
        return Xs @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        return _softmax(self.decision_function(X))

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


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def _fit_sklearn(Xs: np.ndarray, y: np.ndarray, n_classes: int, Cs: list[float], max_iter: int,
                 device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """One scikit-learn fit per C: coefficients with one row per class (also for two classes)."""
    coefs, intercepts, n_iter = [], [], 0
    for C in Cs:
        model = LogisticRegression(C=C, max_iter=max_iter, tol=SKLEARN_TOL).fit(Xs, y)
        coef, intercept = model.coef_, model.intercept_
        if n_classes == 2:  # scikit-learn keeps one row: class 1 against class 0
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        coefs.append(coef.astype(np.float32))
        intercepts.append(intercept.astype(np.float32))
        n_iter = max(n_iter, int(model.n_iter_.max()))
    return coefs, intercepts, n_iter


def _fit_torch(Xs: np.ndarray, y: np.ndarray, n_classes: int, Cs: list[float], max_iter: int,
               device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    X = torch.from_numpy(Xs).to(device)
    # Two classes: scikit-learn's binary model with C equals the symmetric softmax one with C / 2.
    Cs_eff = [C / 2 if n_classes == 2 else C for C in Cs]
    W, n_iter = lbfgs_multinomial(X, torch.from_numpy(y).to(device), n_classes, Cs_eff, max_iter)
    W = W.cpu().numpy()
    return [w[:-1].T.copy() for w in W], [w[-1].copy() for w in W], n_iter


class _Problems:
    """Loss and gradient of several multinomial problems on the same data, in one matmul each."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, n_classes: int):
        self.X, self.y, self.k = X, y, n_classes
        self.rows = torch.arange(len(y), device=X.device)

    def evaluate(self, W: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective per problem and the ``(n, b, k)`` probabilities, for weights ``(b, d + 1, k)``."""
        b, d1, k = W.shape
        Z = (self.X @ W[:, :-1].permute(1, 0, 2).reshape(d1 - 1, b * k)).view(-1, b, k) + W[:, -1]
        Z -= Z.amax(dim=2, keepdim=True)
        P = Z.exp()
        total = P.sum(dim=2)
        nll = total.log() - Z[self.rows, :, self.y]
        f = nll.double().mean(0) + 0.5 * lam * W[:, :-1].double().square().sum((1, 2))
        return f, P.div_(total[:, :, None])

    def grad(self, W: torch.Tensor, P: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        G = P.clone()
        G[self.rows, :, self.y] -= 1.0
        G /= len(self.y)
        b = W.shape[0]
        body = (self.X.T @ G.reshape(len(self.y), -1)).view(-1, b, self.k).permute(1, 0, 2)
        body = body + lam.to(W.dtype)[:, None, None] * W[:, :-1]
        return torch.cat([body, G.sum(0)[:, None, :]], dim=1)


def lbfgs_multinomial(X: torch.Tensor, y: torch.Tensor, n_classes: int, Cs: list[float],
                      max_iter: int = 1000, tol: float = TOL, ftol: float = FTOL, memory: int = 10
                      ) -> tuple[torch.Tensor, int]:
    """Minimise scikit-learn's multinomial objective for every C at once; ``(b, d + 1, k)`` weights.

    L-BFGS whose initial inverse Hessian is ``(A + mu I)^-1`` (``A`` the features' second
    moment, ``mu`` the regularisation relative to the softmax curvature): correlated CNN
    features make the plain problem ill-conditioned; preconditioned, it needs far fewer steps.
    Each problem keeps its own history and step, and stops once its largest gradient entry is
    below *tol* and the decrease its next step predicts is below *ftol* (relative to the loss):
    a small gradient alone stops too early on ill-conditioned problems.
    """
    n, d = X.shape
    b, k, dev = len(Cs), n_classes, X.device
    lam = torch.tensor([1.0 / (C * n) for C in Cs], dtype=torch.float64, device=dev)
    problems = _Problems(X, y, k)
    precondition = _preconditioner(X, lam * k)
    W = torch.zeros(b, d + 1, k, device=dev)
    f, P = problems.evaluate(W, lam)
    g = problems.grad(W, P, lam)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    active = torch.ones(b, dtype=torch.bool, device=dev)
    n_iter = 0
    while n_iter < max_iter:
        idx = active.nonzero().squeeze(1)
        g_idx = _rows(g, idx)
        direction = -_two_loop(g_idx, [tuple(_rows(t, idx) for t in pair) for pair in history],
                               precondition, idx)
        if n_iter == 0:
            direction /= direction.abs().amax((1, 2), keepdim=True).clamp(min=1.0)
        slope = (g_idx * direction).sum((1, 2)).double()
        going = (g_idx.abs().amax((1, 2)) > tol) | (-slope / 2 > ftol * f[idx].abs().clamp(min=1))
        active[idx[~going]] = False
        idx, direction, slope = idx[going], direction[going], slope[going]
        if not len(idx):
            break
        n_iter += 1
        ok, W_ok, P_ok, f_ok = _armijo(problems, W[idx], f[idx], direction, slope, lam[idx])
        active[idx[~ok]] = False  # no step decreased the loss: as good as float32 allows
        idx = idx[ok]
        if not len(idx):
            break
        g_ok = problems.grad(W_ok, P_ok, lam[idx])
        pair = (torch.zeros_like(W), torch.zeros_like(W), torch.zeros(b, device=dev))
        pair[0][idx], pair[1][idx] = W_ok - W[idx], g_ok - g[idx]
        sy = (pair[0][idx] * pair[1][idx]).sum((1, 2))
        pair[2][idx] = torch.where(sy > 1e-10, 1.0 / sy.clamp(min=1e-10), torch.zeros_like(sy))
        history = (history + [pair])[-memory:]
        W[idx], f[idx], g[idx] = W_ok, f_ok, g_ok
        if len(idx) == b:
            P = P_ok
        else:
            P[:, idx] = P_ok
    return W, n_iter


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` without the copy when *idx* is every row."""
    return t if len(idx) == len(t) else t[idx]


def _preconditioner(X: torch.Tensor, mu: torch.Tensor):
    """``v -> (A + mu I)^-1 v`` per problem, ``A`` the second moment of (a sample of) the rows."""
    n, d = X.shape
    sample = X[torch.randperm(n, generator=torch.Generator().manual_seed(0))[: 4 * d].to(X.device)]
    A = (sample.T @ sample).double() / len(sample)
    floor = 1e-4 * A.diagonal().mean()
    eye = torch.eye(d, dtype=torch.float64, device=X.device)
    factors = torch.linalg.cholesky(A + (mu.clamp(min=floor)[:, None, None] * eye)).to(X.dtype)
    intercept = (1.0 / (1.0 + mu)).to(X.dtype)

    def apply(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        body = torch.cholesky_solve(v[:, :-1], _rows(factors, idx))
        return torch.cat([body, v[:, -1:] * _rows(intercept, idx)[:, None, None]], dim=1)
    return apply


def _two_loop(g: torch.Tensor, history: list, precondition, idx: torch.Tensor) -> torch.Tensor:
    """L-BFGS's approximate inverse Hessian times *g*, batched over the first dimension."""
    q, alphas = g.clone(), []
    for s, y, rho in reversed(history):
        alpha = rho * (s * q).sum((1, 2))
        q -= alpha[:, None, None] * y
        alphas.append(alpha)
    r = precondition(q, idx)
    if history:
        s, y, rho = history[-1]
        Py = precondition(y, idx)
        gamma = torch.where(rho > 0, (s * y).sum((1, 2)) / (y * Py).sum((1, 2)).clamp(min=1e-30),
                            torch.ones_like(rho))
        r *= gamma[:, None, None]
    for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
        beta = rho * (y * r).sum((1, 2))
        r += (alpha - beta)[:, None, None] * s
    return r


def _armijo(problems: _Problems, W: torch.Tensor, f: torch.Tensor, direction: torch.Tensor,
            slope: torch.Tensor, lam: torch.Tensor, tries: int = 30):
    """Backtracking line search per problem: which found a decrease, and their new W, P and f."""
    step = torch.ones(len(W), dtype=torch.float64, device=W.device)
    todo = torch.arange(len(W), device=W.device)
    found = []
    for _ in range(tries):
        trial = W[todo] + step[todo].to(W.dtype)[:, None, None] * direction[todo]
        f_trial, P_trial = problems.evaluate(trial, lam[todo])
        good = (f_trial < f[todo]) & (f_trial <= f[todo] + 1e-4 * step[todo] * slope[todo])
        if good.all() and len(todo) == len(W):
            return good, trial, P_trial, f_trial
        found.append((todo[good], trial[good], P_trial[:, good], f_trial[good]))
        todo = todo[~good]
        if not len(todo):
            break
        step[todo] *= 0.5
    index = torch.cat([part[0] for part in found])
    ok = torch.zeros(len(W), dtype=torch.bool, device=W.device)
    ok[index] = True
    order = index.argsort()  # back to the order of the problems
    W_ok, P_ok, f_ok = (torch.cat([part[j] for part in found], dim=1 if j == 2 else 0) for j in (1, 2, 3))
    return ok, W_ok[order], P_ok[:, order], f_ok[order]
