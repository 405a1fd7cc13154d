"""Last-layer Laplace head: a linear softmax layer fitted by MAP, then a Gaussian posterior over its weights.

The MAP fit is the LR head's batched L-BFGS (:mod:`xferkit.heads._lbfgs`), one fit per prior precision
of a grid, and the precision kept is the one whose Laplace approximation of the marginal likelihood
(the evidence) is highest. The posterior precision is the generalised Gauss-Newton of the softmax
cross-entropy, which for a linear layer on inputs ``phi = [z, 1]`` is ``sum_n phi phi^T (x) Lambda_n``
(``Lambda = diag(p) - p p^T``), plus the prior. Its full ``(d+1)k`` square is 1.2 GiB in float64 for
1280 features and 10 classes, so it is Kronecker-factored (KFAC): ``A (x) B`` with ``A = sum phi phi^T``
and ``B`` the mean of ``Lambda_n``; both eigendecompositions give the evidence and every logit covariance
in closed form. Measured on sample_data's features (benchmarks/laplace.py): on 64 principal components
the exact GGN's test NLL is 0.551 against KFAC's 0.558; at all 1280, a diagonal posterior's evidence is
-730 against KFAC's -517 (laplace-torch's). Predictions integrate the softmax over the Gaussian logits,
shifts of all logits alike projected out, by the probit approximation (or by Monte Carlo).

laplace-torch 0.3 installs with this torch and gives these numbers on a linear layer, but it adds seven
packages (an alpha asdfghjkl among them) for what is closed form here, and its posteriors persist only
through ``torch.save`` (pickle), which model folders never hold: this module writes the few lines itself.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from scipy.special import log_softmax, logsumexp, softmax
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from xferkit.core.devices import resolve_device
from xferkit.core.metrics import predictive_entropy
from xferkit.core.saved import require
from xferkit.heads._lbfgs import lbfgs_multinomial
from xferkit.heads.base import SEED, ArraySpec, FeatureHead, ProgressCallback, draw_seed
from xferkit.heads.exportable import Standardised, constant

#: Prior precisions whose MAP fits the evidence chooses among: 1 / the LR head's C grid, in half decades.
PRIOR_PRECISIONS = tuple(10.0 ** (k / 2) for k in range(-4, 9))
#: The probit approximation's constant: E[sigmoid(f)] ~ sigmoid(mu / sqrt(1 + pi / 8 var)).
PROBIT = math.pi / 8


class LaplaceHead(FeatureHead):
    """Softmax regression on standardised features with a Kronecker-factored Laplace posterior on its weights.

    Parameters
    ----------
    prior_precision : float or None, default=None
        Precision of the Gaussian prior on every weight; None chooses it by the Laplace marginal likelihood.
    link : {"probit", "mc"}, default="probit"
        How predict_proba averages the softmax over the posterior: probit approximation or Monte Carlo.
    mc_samples : int, default=200
        Logit samples for link="mc" and for the mutual information of uncertainty().
    max_iter : int, default=1000
        Most L-BFGS iterations of each MAP fit.
    random_state : int or None, default=None
        Seed of the logit samples (the same samples at every prediction).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels seen in fit, in the order of predict_proba's columns.
    n_features_in_ : int
        Number of features seen in fit.
    mean_, scale_ : ndarray of shape (n_features_in_,)
        Per-feature mean and standard deviation used to standardise X.
    weights_ : ndarray of shape (n_features_in_ + 1, n_classes)
        MAP weights on the standardised features, the intercepts in the last row.
    a_eigenvalues_, a_eigenvectors_ : ndarray of shape (n_features_in_ + 1,) and its square
        Eigendecomposition of A, the inputs' Kronecker factor of the curvature.
    b_eigenvalues_, b_eigenvectors_ : ndarray of shape (n_classes,) and its square
        Eigendecomposition of B, the mean softmax Hessian in logit space.
    prior_precision_ : float
        The prior precision of the posterior.
    log_marginal_likelihood_ : float
        The Laplace approximation of the log evidence at prior_precision_.
    n_iter_ : int
        L-BFGS iterations of the MAP fit(s).
    seed_ : int
        Seed drawn from random_state at fit, for the logit samples.
    """

    name = "laplace"
    _parameter_constraints = {
        "prior_precision": [Interval(Real, 0, None, closed="neither"), None],
        "link": [StrOptions({"probit", "mc"})],
        "mc_samples": [Interval(Integral, 1, 100_000, closed="both")],
        "max_iter": [Interval(Integral, 1, 100_000, closed="both")],
        "random_state": ["random_state"],
    }
    _fitted_scalars = {
        "prior_precision_": [Interval(Real, 0, None, closed="neither")],
        "log_marginal_likelihood_": [Interval(Real, None, None, closed="neither")],
        "n_iter_": [Interval(Integral, 0, None, closed="left")],
        "seed_": SEED,
    }

    def __init__(self, prior_precision: float | None = None, *, link: str = "probit", mc_samples: int = 200,
                 max_iter: int = 1000, random_state: int | None = None):
        self.prior_precision = prior_precision
        self.link = link
        self.mc_samples = mc_samples
        self.max_iter = max_iter
        self.random_state = random_state

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"prior_precision": trial.suggest_float("prior_precision", 1e-2, 1e4, log=True)}

    def _fit(self, X: np.ndarray, y: np.ndarray, progress: ProgressCallback) -> None:
        self.seed_ = draw_seed(self.random_state)
        Z = self._standardised(X, np.float32)
        precisions = [float(self.prior_precision)] if self.prior_precision is not None else PRIOR_PRECISIONS
        device = resolve_device("auto")
        # the solver minimises the mean log-loss + ||W||^2 / (2 C n): prior precision delta is C = 1/delta
        W, self.n_iter_ = lbfgs_multinomial(torch.from_numpy(Z).to(device), torch.from_numpy(y).to(device),
                                            len(self.classes_), [1 / delta for delta in precisions],
                                            self.max_iter)
        progress(1, 2, f"{len(precisions)} MAP fit(s), {self.n_iter_} iterations")
        Phi = _augmented(Z.astype(np.float64))
        a, U = np.linalg.eigh(Phi.T @ Phi)
        a = a.clip(min=0)
        weights = W.cpu().double().numpy()
        fits = [_evidence(Phi, y, w, a, delta) for w, delta in zip(weights, precisions, strict=True)]
        best = int(np.argmax([evidence for evidence, _, _ in fits]))
        self.log_marginal_likelihood_, b, V = fits[best]
        self.weights_, self.prior_precision_ = weights[best], precisions[best]
        self.a_eigenvalues_, self.a_eigenvectors_, self.b_eigenvalues_, self.b_eigenvectors_ = a, U, b, V
        progress(2, 2, f"prior precision {self.prior_precision_:g}, "
                       f"log evidence {self.log_marginal_likelihood_:.1f}")

    # --- prediction ------------------------------------------------------------------------------
    def _logits(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Mean logits ``(n, k)`` and their posterior variances in the eigenbasis of B ``(n, k)``."""
        Phi = _augmented(self._standardised(self._validated(X)))
        projected = (Phi @ self.a_eigenvectors_) ** 2
        return Phi @ self.weights_, projected @ self._inverse_eigenvalues()

    def _inverse_eigenvalues(self) -> np.ndarray:
        """``1 / (a_i b_j + delta)``: the posterior covariance's eigenvalues, ``(d + 1, k)``."""
        return 1 / (np.outer(self.a_eigenvalues_, self.b_eigenvalues_) + self.prior_precision_)

    def _centred_basis(self) -> np.ndarray:
        """B's eigenvectors less their mean over classes: shifting every logit alike changes nothing."""
        return self.b_eigenvectors_ - self.b_eigenvectors_.mean(axis=0)

    def _logit_samples(self, mean: np.ndarray, variances: np.ndarray) -> np.ndarray:
        """``(mc_samples, n, k)`` logits from the posterior, every row with the same standard normal draws."""
        eps = np.random.default_rng(self.seed_).standard_normal((self.mc_samples, 1, len(self.classes_)))
        return mean + (eps * np.sqrt(variances)) @ self.b_eigenvectors_.T

    def predict_proba(self, X) -> np.ndarray:
        mean, variances = self._logits(X)
        if self.link == "mc":
            return softmax(self._logit_samples(mean, variances), axis=2).mean(axis=0)
        return softmax(mean / np.sqrt(1 + PROBIT * variances @ self._centred_basis().T ** 2), axis=1)

    def uncertainty(self, X) -> dict[str, np.ndarray]:
        """Predictive entropy; the mean posterior variance of the (centred) logits, which grows away from
        the training data; and the mutual information between label and weights, by Monte Carlo."""
        mean, variances = self._logits(X)
        samples = softmax(self._logit_samples(mean, variances), axis=2)
        entropy = predictive_entropy(self.predict_proba(X))
        mc_entropy = predictive_entropy(samples.mean(axis=0))
        expected = np.mean([predictive_entropy(p) for p in samples], axis=0)
        return {"entropy": entropy, "variance": (variances @ self._centred_basis().T ** 2).mean(axis=1),
                "mutual_information": np.maximum(mc_entropy - expected, 0)}

    def torch_modules(self) -> dict[str, nn.Module]:
        """The probit predictive in torch; with ``link="mc"`` the probit is its approximation."""
        check_is_fitted(self)
        probit = _ProbitPredictive(self.weights_, self.a_eigenvectors_, self._inverse_eigenvalues(),
                                   self._centred_basis())
        return {"probit": Standardised(self.mean_, self.scale_, probit)}

    # --- persistence -----------------------------------------------------------------------------
    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights_, "a_eigenvalues": self.a_eigenvalues_,
                "a_eigenvectors": self.a_eigenvectors_, "b_eigenvalues": self.b_eigenvalues_,
                "b_eigenvectors": self.b_eigenvectors_}

    def _array_specs(self, arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        d1, k = self.n_features_in_ + 1, len(self.classes_)
        return {"weights": ArraySpec((d1, k)), "a_eigenvalues": ArraySpec((d1,)),
                "a_eigenvectors": ArraySpec((d1, d1)), "b_eigenvalues": ArraySpec((k,)),
                "b_eigenvectors": ArraySpec((k, k))}

    def _restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        # a negative eigenvalue could make a variance negative: fit never keeps one
        require(all((arrays[key] >= 0).all() for key in ("a_eigenvalues", "b_eigenvalues")),
                "arrays a_eigenvalues and b_eigenvalues must not be negative")
        for key, value in arrays.items():
            setattr(self, f"{key}_", value)


def _augmented(Z: np.ndarray) -> np.ndarray:
    """``[Z, 1]``: the inputs of the linear layer, its intercept a weight on a constant input."""
    return np.hstack([Z, np.ones((len(Z), 1), dtype=Z.dtype)])


def _evidence(Phi: np.ndarray, y: np.ndarray, weights: np.ndarray, a: np.ndarray, delta: float
              ) -> tuple[float, np.ndarray, np.ndarray]:
    """Laplace log evidence of MAP *weights* under prior precision *delta*, with B's eigendecomposition.

    ``log p(D | delta) ~ log p(D | W) - delta/2 ||W||^2 + P/2 log delta - 1/2 log det(A (x) B + delta I)``,
    ``P`` the number of weights (the intercepts, unpenalised in the MAP fit as in the LR head's, share
    the prior here: the posterior must be proper).
    """
    logits = Phi @ weights
    log_likelihood = float(log_softmax(logits, axis=1)[np.arange(len(y)), y].sum())
    p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    b, V = np.linalg.eigh(np.diag(p.mean(axis=0)) - p.T @ p / len(p))
    b = b.clip(min=0)
    log_det = float(np.log(np.outer(a, b) + delta).sum())
    evidence = log_likelihood - delta / 2 * float((weights ** 2).sum()) + weights.size / 2 * math.log(delta)
    return evidence - log_det / 2, b, V


class _ProbitPredictive(nn.Module):
    """:meth:`LaplaceHead.predict_proba` with ``link="probit"``, on standardised features."""

    def __init__(self, weights: np.ndarray, a_eigenvectors: np.ndarray, inverse_eigenvalues: np.ndarray,
                 centred_basis: np.ndarray):
        super().__init__()
        self.register_buffer("weights", constant(weights))
        self.register_buffer("a_eigenvectors", constant(a_eigenvectors))
        self.register_buffer("inverse_eigenvalues", constant(inverse_eigenvalues))
        self.register_buffer("centred_squared", constant(centred_basis.T ** 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        phi = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
        variances = ((phi @ self.a_eigenvectors) ** 2 @ self.inverse_eigenvalues) @ self.centred_squared
        return torch.softmax(phi @ self.weights / torch.sqrt(1 + PROBIT * variances), dim=1)
