"""Gaussian-process classifier on features: exact Dirichlet GP for small data, SVGP for large data.

On CNN features both GPs rank classes well but are under-confident: in hundreds of dimensions
every point is far from every other, so the latent posterior variance stays large and the
softmax averaged over it flattens. A temperature on the predictive log-probabilities, chosen by
NLL on held-out predictions, corrects this without changing any prediction's class: the exact
GP's closed-form leave-one-out predictions of the training set (no validation data needed), the
SVGP's validation split.
"""

from __future__ import annotations

import math
from enum import Enum

import gpytorch
import numpy as np
import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import RBFKernel, ScaleKernel
from gpytorch.likelihoods import DirichletClassificationLikelihood, SoftmaxLikelihood
from gpytorch.means import ConstantMean
from gpytorch.variational import (
    CholeskyVariationalDistribution,
    IndependentMultitaskVariationalStrategy,
    VariationalStrategy,
)
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.cluster import KMeans
from sklearn.utils.validation import check_is_fitted

from xferkit.devices import resolve_device
from xferkit.errors import XferkitError
from xferkit.heads.base import Head, check_positive, predictive_entropy
from xferkit.progress import progress_bar

#: ``method="auto"`` fits the exact GP up to this many training examples, an SVGP beyond.
EXACT_MAX_N = 2000
#: Latent samples per example when integrating the softmax over the GP posterior.
PREDICT_SAMPLES = 256
#: SVGP minibatch size; also the chunk size for prediction.
BATCH_SIZE = 256
#: SVGP training stops once the mean epoch loss of the last WINDOW epochs is within this relative
#: amount of the WINDOW before (the exact GP's L-BFGS has its own convergence test).
CONVERGED, WINDOW = 1e-3, 10
#: Range searched for the temperature, and the standard deviation of its log-normal prior: without
#: one, held-out predictions that are all right would drive it to the lower end (certainty).
TEMPERATURE_RANGE, TEMPERATURE_PRIOR_STD = (1e-2, 1e2), 1.0


class GPMethod(str, Enum):
    auto = "auto"
    exact = "exact"
    svgp = "svgp"


class GPHead(Head):
    """One latent GP per class (RBF kernel, learned lengthscale) on standardised, maybe projected inputs.

    ``epochs`` caps the passes over the data (both stop sooner once converged; ``epochs_`` says when);
    ``lr`` is the SVGP's Adam step; ``alpha_epsilon`` is the Dirichlet label transform's pseudo-count
    (Milios et al. 2018); ``temperature=None`` fits it on held-out predictions (1 for an SVGP fitted
    without validation data), a number fixes it (1: the GP's own predictive).
    """

    name = "gp"

    def __init__(self, method: str = "auto", inducing: int = 256, dim: int | None = None, ard: bool = False,
                 epochs: int = 100, lr: float = 0.1, alpha_epsilon: float = 0.01,
                 temperature: float | None = None, seed: int = 0):
        self.method = method
        self.inducing = inducing
        self.dim = dim
        self.ard = ard
        self.epochs = epochs
        self.lr = lr
        self.alpha_epsilon = alpha_epsilon
        self.temperature = temperature
        self.seed = seed

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"lr": trial.suggest_float("lr", 0.01, 0.3, log=True),
                "ard": trial.suggest_categorical("ard", [False, True])}

    def fit(self, X, y, X_val=None, y_val=None) -> GPHead:
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
        self.method_ = self._resolve_method(len(X), X.shape[1])
        self.classes_ = np.unique(y)
        self.device_ = resolve_device("auto")
        self._fit_inputs(torch.from_numpy(X))
        Z = self._inputs(X)
        self.targets_ = torch.from_numpy(np.searchsorted(self.classes_, y)).to(self.device_)
        with torch.random.fork_rng(devices=[self.device_] if self.device_.type == "cuda" else []):
            torch.manual_seed(self.seed)  # gpytorch initialises and shuffles with torch's generator
            if self.method_ == "exact":
                self.model_ = self._build(Z.shape[1], train=(Z, self.targets_))
                self._train_exact(Z)
            else:
                self.model_ = self._build(Z.shape[1], inducing=self._kmeans(Z))
                self._train_svgp(Z, self.targets_)
        self.temperature_ = self._fit_temperature(Z, X_val, y_val)
        return self

    def _resolve_method(self, n: int, d: int) -> str:
        check_positive(inducing=self.inducing, dim=self.dim, epochs=self.epochs, lr=self.lr,
                       alpha_epsilon=self.alpha_epsilon, temperature=self.temperature)
        try:
            method = GPMethod(self.method)
        except ValueError:
            raise XferkitError(f"unknown GP method {self.method!r}; use auto, exact or svgp.") from None
        if self.dim is not None and self.dim > min(n - 1, d):
            raise XferkitError(f"dim={self.dim} is too large: the projection needs dim < n ({n}) "
                               f"and dim <= the feature dimension ({d}).")
        if method == GPMethod.auto:
            method = GPMethod.exact if n <= EXACT_MAX_N else GPMethod.svgp
        if method == GPMethod.svgp and self.inducing > n:
            raise XferkitError(f"inducing={self.inducing} exceeds the {n} training examples; "
                               "use --inducing at most n.")
        return method.value

    # --- inputs: standardise, optionally whiten-project to ``dim`` principal directions, then divide
    # by sqrt(dims) so that typical distances are ~1 and lengthscales start (and move) at that scale.
    def _fit_inputs(self, X: torch.Tensor) -> None:
        self.mean_, self.scale_ = X.mean(0), X.std(0).clamp_min(1e-6)
        self.projection_ = None
        if self.dim is not None:
            Z = (X - self.mean_) / self.scale_
            eigval, eigvec = torch.linalg.eigh(Z.T @ Z / (len(Z) - 1))
            top = torch.argsort(eigval, descending=True)[:self.dim]
            self.projection_ = (eigvec[:, top] / eigval[top].clamp_min(1e-12).sqrt()).float()

    def _inputs(self, X) -> torch.Tensor:
        Z = (torch.as_tensor(np.asarray(X, dtype=np.float32)) - self.mean_) / self.scale_
        if self.projection_ is not None:
            Z = Z @ self.projection_
        return (Z / math.sqrt(Z.shape[1])).to(self.device_)

    def _kmeans(self, Z: torch.Tensor) -> torch.Tensor:
        km = KMeans(self.inducing, n_init=1, random_state=self.seed).fit(Z.cpu().numpy())
        return torch.from_numpy(km.cluster_centers_).float()

    # --- models ----------------------------------------------------------------------------------
    def _build(self, d: int, train: tuple[torch.Tensor, torch.Tensor] | None = None,
               inducing: torch.Tensor | None = None):
        """The exact model conditions on *train* (inputs, class indices); the SVGP starts at *inducing*."""
        n_classes, ard_dims = len(self.classes_), d if self.ard else None
        if self.method_ == "exact":
            Z, targets = train
            likelihood = DirichletClassificationLikelihood(targets, alpha_epsilon=self.alpha_epsilon,
                                                           learn_additional_noise=True)
            model = _DirichletGP(Z, likelihood.transformed_targets, likelihood, n_classes, ard_dims)
        else:
            model = _SVGP(inducing, n_classes, ard_dims)
            model.likelihood = SoftmaxLikelihood(num_classes=n_classes, mixing_weights=False)
        return model.to(self.device_)

    def _train_exact(self, Z: torch.Tensor) -> None:
        """L-BFGS on the exact marginal likelihood of the Dirichlet-transformed labels.

        The objective is deterministic and has a few dozen parameters: L-BFGS converges in tens of
        passes where Adam needs hundreds. Each evaluation is one pass; it stops after about ``epochs``.
        """
        model = self.model_
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        optimizer = torch.optim.LBFGS(model.parameters(), max_iter=self.epochs, max_eval=self.epochs,
                                      line_search_fn="strong_wolfe")
        losses: list[float] = []
        model.train()
        with progress_bar("gp (exact)", self.epochs, unit="epoch") as advance, _cholesky():
            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = -mll(model(Z), model.likelihood.transformed_targets).sum()
                loss.backward()
                losses.append(loss.item())
                advance(info=f"loss {losses[-1]:.3f}")
                return loss
            optimizer.step(closure)
        self.epochs_ = len(losses)
        model.eval()

    def _train_svgp(self, Z: torch.Tensor, targets: torch.Tensor) -> None:
        """Minibatch Adam on the variational ELBO of the softmax likelihood, until it stops improving."""
        model = self.model_
        elbo = gpytorch.mlls.VariationalELBO(model.likelihood, model, num_data=len(Z))
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        losses: list[float] = []
        model.train()
        with progress_bar("gp (svgp)", self.epochs, unit="epoch") as advance:
            for _ in range(self.epochs):
                total = 0.0
                for idx in torch.randperm(len(Z), device=Z.device).split(BATCH_SIZE):
                    optimizer.zero_grad()
                    loss = -elbo(model(Z[idx]), targets[idx])
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(idx)
                losses.append(total / len(Z))
                advance(info=f"loss {losses[-1]:.3f}")
                if _plateaued(losses):
                    break
        self.epochs_ = len(losses)
        model.eval()

    # --- calibration -----------------------------------------------------------------------------
    def _fit_temperature(self, Z: torch.Tensor, X_val, y_val) -> float:
        """The given temperature, else the one that minimises the NLL of held-out predictions."""
        if self.temperature is not None:
            return float(self.temperature)
        if self.method_ == "exact":
            mean, var = self._leave_one_out(Z)
            proba = torch.cat([self._mc_softmax(m, v) for m, v in
                               zip(mean.split(BATCH_SIZE), var.split(BATCH_SIZE), strict=True)]).numpy()
            y = self.targets_.cpu().numpy()
        elif X_val is not None and len(X_val):
            proba, y = self._predict(X_val)[0], np.searchsorted(self.classes_, np.asarray(y_val))
        else:
            return 1.0
        return fit_temperature(proba, y)

    def _leave_one_out(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance, ``(n, n_classes)``, of each training example given all the others.

        Closed form for a GP (Rasmussen & Williams, eq. 5.12): with ``K`` the prior covariance plus
        label noise and ``r`` the targets minus the prior mean, ``mu_i = y_i - (K^-1 r)_i / (K^-1)_ii``
        and the noisy variance is ``1 / (K^-1)_ii``; one class at a time, in float64.
        """
        model, likelihood = self.model_, self.model_.likelihood
        with torch.no_grad():
            base = model.covar_module.base_kernel(Z).to_dense().double()
            scales = model.covar_module.outputscale.double()
            noises = (likelihood.noise + likelihood.second_noise).double()
            targets = likelihood.transformed_targets.double()
            residuals = targets - model.mean_module(Z).double()
        means, variances = [], []
        for scale, noise, target, residual in zip(scales, noises, targets, residuals, strict=True):
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(scale * base + torch.diag(noise)))
            precision = inverse.diagonal()
            means.append(target - inverse @ residual / precision)
            variances.append((1 / precision - noise).clamp_min(0))
        return torch.stack(means, 1).float().cpu(), torch.stack(variances, 1).float().cpu()

    # --- prediction ------------------------------------------------------------------------------
    def _latent(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance of each class's latent function, both ``(n, n_classes)``."""
        self.model_.eval()
        with torch.no_grad(), _cholesky():
            dist = self.model_(Z)
        if self.method_ == "exact":  # a batch of one GP per class: (n_classes, n)
            return dist.mean.T, dist.variance.T
        return dist.mean, dist.variance

    def _mc_softmax(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """The softmax averaged over the latent marginals by Monte Carlo (seeded, the same draws for all)."""
        eps = torch.randn(PREDICT_SAMPLES, 1, len(self.classes_),
                          generator=torch.Generator().manual_seed(self.seed)).to(mean.device)
        return (mean + var.clamp_min(0).sqrt() * eps).softmax(-1).mean(0).cpu()

    def _predict(self, X) -> tuple[np.ndarray, np.ndarray]:
        """The GP's own probabilities (before the temperature), and latent variances."""
        check_is_fitted(self, "model_")
        probas, variances = [], []
        for Z in self._inputs(X).split(BATCH_SIZE):
            mean, var = self._latent(Z)
            probas.append(self._mc_softmax(mean, var))
            variances.append(var.cpu())
        n_classes = len(self.classes_)
        return (torch.cat(probas).numpy() if probas else np.zeros((0, n_classes), np.float32),
                torch.cat(variances).numpy() if variances else np.zeros((0, n_classes), np.float32))

    def predict_proba(self, X) -> np.ndarray:
        return temper(self._predict(X)[0], self.temperature_)

    def uncertainty(self, X) -> dict[str, np.ndarray]:
        """Predictive entropy, and the latent posterior variance of the predicted class."""
        proba, variance = self._predict(X)
        proba = temper(proba, self.temperature_)
        predicted = proba.argmax(1)
        return {"entropy": predictive_entropy(proba),
                "variance": variance[np.arange(len(proba)), predicted]}

    # --- persistence -----------------------------------------------------------------------------
    def _get_state(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        state.update({"mean": self.mean_, "scale": self.scale_})
        if self.projection_ is not None:
            state["projection"] = self.projection_
        if self.method_ == "exact":  # the exact posterior conditions on the training set itself
            state.update({"train_inputs": self.model_.train_inputs[0], "train_targets": self.targets_})
        return state

    def _set_state(self, state: dict[str, torch.Tensor], info: dict) -> None:
        self.method_, self.temperature_, self.epochs_ = info["method"], info["temperature"], info["epochs"]
        self.device_ = resolve_device("auto")
        self.mean_, self.scale_ = state.pop("mean"), state.pop("scale")
        self.projection_ = state.pop("projection", None)
        d = len(self.mean_) if self.projection_ is None else self.projection_.shape[1]
        if self.method_ == "exact":
            self.targets_ = state.pop("train_targets").to(self.device_)
            self.model_ = self._build(d, train=(state.pop("train_inputs").to(self.device_), self.targets_))
        else:
            self.model_ = self._build(d, inducing=torch.zeros(self.inducing, d))
        self.model_.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        self.model_.eval()

    def _get_info(self) -> dict:
        return {"method": self.method_, "epochs": self.epochs_, "temperature": self.temperature_}


class _DirichletGP(gpytorch.models.ExactGP):
    """A batch of independent GPs, one per class, regressed on Dirichlet-transformed labels."""

    def __init__(self, Z, targets, likelihood, n_classes: int, ard_dims: int | None):
        super().__init__(Z, targets, likelihood)
        self.mean_module = ConstantMean(batch_shape=torch.Size([n_classes]))
        self.covar_module = _kernel(n_classes, ard_dims)

    def forward(self, x: torch.Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))


class _SVGP(gpytorch.models.ApproximateGP):
    """Independent sparse variational GPs, one per class, sharing k-means-initialised inducing points."""

    def __init__(self, inducing: torch.Tensor, n_classes: int, ard_dims: int | None):
        batch = torch.Size([n_classes])
        distribution = CholeskyVariationalDistribution(len(inducing), batch_shape=batch)
        strategy = VariationalStrategy(self, inducing, distribution,
                                       learn_inducing_locations=False)
        super().__init__(IndependentMultitaskVariationalStrategy(strategy, num_tasks=n_classes))
        self.mean_module = ConstantMean(batch_shape=batch)
        self.covar_module = _kernel(n_classes, ard_dims)

    def forward(self, x: torch.Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _kernel(n_classes: int, ard_dims: int | None) -> ScaleKernel:
    """RBF lengthscale(s) shared by the classes (one distance computation), an output scale per class."""
    return ScaleKernel(RBFKernel(ard_num_dims=ard_dims), batch_shape=torch.Size([n_classes]))


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The most probable temperature given :func:`temper`-ed *proba* on labels *y* (log-normal prior)."""
    log_p, rows = np.log(np.clip(proba, 1e-12, 1.0)), np.arange(len(y))

    def negative_log_posterior(log_t: float) -> float:
        nll = -log_softmax(log_p / np.exp(log_t), axis=1)[rows, y].sum()
        return nll + 0.5 * (log_t / TEMPERATURE_PRIOR_STD) ** 2
    result = minimize_scalar(negative_log_posterior, bounds=np.log(TEMPERATURE_RANGE), method="bounded")
    return float(np.exp(result.x))


def temper(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities proportional to ``proba ** (1 / T)``: sharper for ``T < 1``, same ranking of classes."""
    if temperature == 1.0:
        return proba
    return softmax(np.log(np.clip(proba, 1e-12, 1.0)) / temperature, axis=1).astype(proba.dtype)


def _plateaued(losses: list[float]) -> bool:
    """Whether the last WINDOW epochs' mean loss is within CONVERGED (relative) of the WINDOW before."""
    if len(losses) < 2 * WINDOW:
        return False
    before, recent = np.mean(losses[-2 * WINDOW:-WINDOW]), np.mean(losses[-WINDOW:])
    return before - recent < CONVERGED * abs(recent)


def _cholesky():
    """Solve by Cholesky, never by conjugate gradients: exact, and deterministic at prediction."""
    return gpytorch.settings.max_cholesky_size(10 ** 9)
