"""A batched, preconditioned L-BFGS for multinomial logistic regression in torch (the LR head's large solver).

It minimises scikit-learn's objective (mean log-loss plus ``||W||^2 / (2 C n)``, the intercept
unpenalised) for several C at once on the same data, on the GPU when there is one.
"""

from __future__ import annotations

import torch

TOL = 1e-4  # largest gradient entry at the optimum found (scikit-learn's default)
FTOL = 1e-6  # decrease of the loss the next step predicts, relative to the loss


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
