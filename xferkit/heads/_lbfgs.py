"""A batched, preconditioned L-BFGS for multinomial logistic regression in torch (the LR head's large solver).

It minimises scikit-learn's objective (mean log-loss plus ``||W||^2 / (2 C n)``, the intercept
unpenalised) for several C at once on the same data, on the GPU when there is one. The exact
full-batch gradient is computed a chunk of rows at a time, so memory is O(chunk): the rows may be a
memory-mapped array read from disk, and under torchrun each rank may hold only its part of them
(``sharded``), the sums then all-reduced so that every rank takes the same steps to the same optimum.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

from xferkit.core.distributed import all_reduce_sum

TOL = 1e-4  # largest gradient entry at the optimum found (scikit-learn's default)
FTOL = 1e-6  # decrease of the loss the next step predicts, relative to the loss
#: Rows per chunk of the objective and gradient: the working memory is about three chunks of features.
CHUNK_ROWS = 32768


class _Chunks:
    """The rows of X a chunk at a time on *device*, standardised on the way (``(x - shift) / scale``).

    X is a torch tensor, or a numpy array (a memory-mapped one is copied a chunk at a time and its
    pages are let go after each, so a matrix larger than memory streams from the page cache).
    ``subset`` (sorted row positions) keeps only those rows, read in the same pass: row ``i`` of the
    chunks is then ``X[subset[i]]``, so a held-out split needs no copy of the rest.
    """

    def __init__(self, X, device: torch.device, shift=None, scale=None, chunk_rows: int = CHUNK_ROWS,
                 subset: np.ndarray | None = None):
        self.X, self.device, self.chunk_rows, self.subset = X, device, chunk_rows, subset
        self.n, self.d = X.shape if subset is None else (len(subset), X.shape[1])
        self.shift, self.scale = (None if a is None else torch.as_tensor(a, dtype=torch.float32).to(device)
                                  for a in (shift, scale))

    def __iter__(self):
        """``(first row, rows)`` of each chunk in order (rows counted in ``subset`` when there is one)."""
        done = 0
        for start in range(0, self.X.shape[0], self.chunk_rows):
            block = self.X[start:start + self.chunk_rows]
            if self.subset is not None:
                first, stop = np.searchsorted(self.subset, [start, start + len(block)])
                if first == stop:
                    continue
                here = self.subset[first:stop] - start
                block = block[torch.from_numpy(here).to(block.device) if torch.is_tensor(block) else here]
            yield done, self._prepared(block)
            done += len(block)

    def take(self, index: np.ndarray) -> torch.Tensor:
        """The rows at *index* (in sorted order), prepared like a chunk.

        A numpy array is read in one pass, chunk by chunk: scattered reads of a memory map would
        each pull the kernel's whole read-ahead window into memory.
        """
        index = torch.from_numpy(np.sort(index))
        if torch.is_tensor(self.X) and self.subset is None:
            return self._prepared(self.X[index.to(self.X.device)])
        parts = []
        for start, rows in self:
            here = index[(index >= start) & (index < start + len(rows))] - start
            parts.append(rows[here.to(self.device)])
        return torch.cat(parts) if parts else torch.zeros(0, self.d, device=self.device)

    def _prepared(self, rows) -> torch.Tensor:
        own = not torch.is_tensor(rows)  # a copy of ours, standardised in place
        if own:
            rows = torch.from_numpy(np.array(rows, dtype=np.float32)).to(self.device)
            _release(self.X)
        if self.shift is not None:
            rows = (rows.sub_(self.shift) if own else rows - self.shift).div_(self.scale)
        return rows


def standardised_chunks(X, shift, scale, chunk_rows: int = CHUNK_ROWS, subset: np.ndarray | None = None):
    """``(first row, rows)`` of *X*'s chunks (of its *subset* rows, when given), standardised, on the CPU."""
    return iter(_Chunks(X, torch.device("cpu"), shift, scale, chunk_rows, subset))


def _release(X: np.ndarray) -> None:
    """Let go of a memory-mapped array's resident pages (still in the page cache): RSS stays O(chunk)."""
    mapping = getattr(X, "_mmap", None)  # numpy.memmap keeps its mmap.mmap there
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class _Problems:
    """Objective and exact gradient of several multinomial problems on the same rows, a chunk at a time.

    ``sharded``: each torchrun rank holds a part of the rows; sums are all-reduced across the ranks.
    """

    def __init__(self, rows: _Chunks, y: torch.Tensor, n_classes: int, sharded: bool = False):
        self.rows, self.y, self.k, self.sharded = rows, y, n_classes, sharded
        self.n = int(self._summed(torch.tensor([float(rows.n)], dtype=torch.float64, device=y.device)).item())

    def _summed(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t) if self.sharded else t

    def evaluate(self, W: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective per problem and its gradient ``(b, d + 1, k)``, for weights ``(b, d + 1, k)``."""
        b, d1, k = W.shape
        flat = W[:, :-1].permute(1, 0, 2).reshape(d1 - 1, b * k)
        nll = torch.zeros(b, dtype=torch.float64, device=W.device)
        body = torch.zeros(d1 - 1, b * k, dtype=W.dtype, device=W.device)
        bias = torch.zeros(b, k, dtype=W.dtype, device=W.device)
        for start, X in self.rows:
            y, rows = self.y[start:start + len(X)], torch.arange(len(X), device=W.device)
            Z = (X @ flat).view(-1, b, k) + W[:, -1]
            Z -= Z.amax(dim=2, keepdim=True)
            P = Z.exp()
            total = P.sum(dim=2)
            nll += (total.log() - Z[rows, :, y]).double().sum(0)
            P /= total[:, :, None]
            P[rows, :, y] -= 1.0
            body += X.T @ P.view(len(X), -1)
            bias += P.sum(0)
        sums = self._summed(torch.cat([nll, body.double().flatten(), bias.double().flatten()]))
        nll, body, bias = sums[:b], sums[b:-b * k].view(d1 - 1, b, k), sums[-b * k:].view(b, k)
        f = nll / self.n + 0.5 * lam * W[:, :-1].double().square().sum((1, 2))
        body = body.permute(1, 0, 2) / self.n + lam[:, None, None] * W[:, :-1].double()
        return f, torch.cat([body, bias[:, None, :] / self.n], dim=1).to(W.dtype)


def lbfgs_multinomial(X, y, n_classes: int, Cs: list[float], max_iter: int = 1000, tol: float = TOL,
                      ftol: float = FTOL, memory: int = 10, *, shift=None, scale=None,
                      chunk_rows: int = CHUNK_ROWS, sharded: bool = False, device: torch.device | None = None,
                      subset: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
    """Minimise scikit-learn's multinomial objective for every C at once; ``(b, d + 1, k)`` weights.

    L-BFGS whose initial inverse Hessian is ``(A + mu I)^-1`` (``A`` the features' second
    moment, ``mu`` the regularisation relative to the softmax curvature): correlated CNN
    features make the plain problem ill-conditioned; preconditioned, it needs far fewer steps.
    Each problem keeps its own history and step, and stops once its largest gradient entry is
    below *tol* and the decrease its next step predicts is below *ftol* (relative to the loss):
    a small gradient alone stops too early on ill-conditioned problems.

    *X* is a torch tensor (computed on its device) or a numpy array, possibly memory-mapped (read
    ``chunk_rows`` at a time onto *device*); ``shift`` and ``scale`` standardise its rows on the
    way; ``subset`` (sorted positions) fits those rows of *X* only, *y* being their labels. ``sharded``:
    under torchrun, this rank's rows only; every rank gets the same weights.
    """
    dev = X.device if torch.is_tensor(X) else torch.device(device or "cpu")
    rows = _Chunks(X, dev, shift, scale, chunk_rows, subset)
    y = torch.as_tensor(y).to(dev)
    b, k, d = len(Cs), n_classes, rows.d
    problems = _Problems(rows, y, k, sharded)
    lam = torch.tensor([1.0 / (C * problems.n) for C in Cs], dtype=torch.float64, device=dev)
    precondition = _preconditioner(problems, lam * k)
    W = torch.zeros(b, d + 1, k, device=dev)
    f, g = problems.evaluate(W, lam)
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
        ok, W_ok, g_ok, f_ok = _armijo(problems, W[idx], f[idx], direction, slope, lam[idx])
        active[idx[~ok]] = False  # no step decreased the loss: as good as float32 allows
        idx = idx[ok]
        if not len(idx):
            break
        pair = (torch.zeros_like(W), torch.zeros_like(W), torch.zeros(b, device=dev))
        pair[0][idx], pair[1][idx] = W_ok - W[idx], g_ok - g[idx]
        sy = (pair[0][idx] * pair[1][idx]).sum((1, 2))
        pair[2][idx] = torch.where(sy > 1e-10, 1.0 / sy.clamp(min=1e-10), torch.zeros_like(sy))
        history = (history + [pair])[-memory:]
        W[idx], f[idx], g[idx] = W_ok, f_ok, g_ok
    return W, n_iter


def row_moments(X, chunk_rows: int = CHUNK_ROWS, sharded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of *X*'s rows, read a chunk at a time (of every rank's rows
    when ``sharded``); two passes, so the variance does not cancel."""
    def summed(parts: list[torch.Tensor]) -> torch.Tensor:
        total = torch.stack(parts).sum(0)
        return all_reduce_sum(total) if sharded else total

    rows = _Chunks(X, torch.device("cpu"), chunk_rows=chunk_rows)
    first = summed([torch.cat([torch.tensor([len(c)], dtype=torch.float64), c.sum(0, dtype=torch.float64)])
                    for _, c in rows])
    n, mean = first[0], first[1:] / first[0]
    variance = summed([(c - mean.float()).square_().sum(0, dtype=torch.float64) for _, c in rows]) / n
    return mean.numpy(), variance.sqrt().numpy()


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` without the copy when *idx* is every row."""
    return t if len(idx) == len(t) else t[idx]


def _preconditioner(problems: _Problems, mu: torch.Tensor):
    """``v -> (A + mu I)^-1 v`` per problem, ``A`` the second moment of (a sample of) the rows."""
    rows = problems.rows
    d, dev = rows.d, problems.y.device
    sample = rows.take(torch.randperm(rows.n, generator=torch.Generator().manual_seed(0))[: 4 * d].numpy())
    count = torch.tensor([float(len(sample))], dtype=torch.float64, device=dev)
    moments = problems._summed(torch.cat([(sample.T @ sample).double().flatten(), count]))
    A = moments[:-1].view(d, d) / moments[-1]
    floor = 1e-4 * A.diagonal().mean()
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    factors = torch.linalg.cholesky(A + (mu.clamp(min=floor)[:, None, None] * eye)).to(sample.dtype)
    intercept = (1.0 / (1.0 + mu)).to(sample.dtype)

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
    """Backtracking line search per problem: which found a decrease, and their new W, gradient and f."""
    step = torch.ones(len(W), dtype=torch.float64, device=W.device)
    todo = torch.arange(len(W), device=W.device)
    found = []
    for _ in range(tries):
        trial = W[todo] + step[todo].to(W.dtype)[:, None, None] * direction[todo]
        f_trial, g_trial = problems.evaluate(trial, lam[todo])
        good = (f_trial < f[todo]) & (f_trial <= f[todo] + 1e-4 * step[todo] * slope[todo])
        if good.all() and len(todo) == len(W):
            return good, trial, g_trial, f_trial
        found.append((todo[good], trial[good], g_trial[good], f_trial[good]))
        todo = todo[~good]
        if not len(todo):
            break
        step[todo] *= 0.5
    index = torch.cat([part[0] for part in found])
    ok = torch.zeros(len(W), dtype=torch.bool, device=W.device)
    ok[index] = True
    order = index.argsort()  # back to the order of the problems
    W_ok, g_ok, f_ok = (torch.cat([part[j] for part in found])[order] for j in (1, 2, 3))
    return ok, W_ok, g_ok, f_ok
