"""Gaussian-process classifier on features: exact Dirichlet GP for small data, SVGP for large data."""

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


class GPMethod(str, Enum):
    auto = "auto"
    exact = "exact"
    svgp = "svgp"


class GPHead(Head):
    """One latent GP per class (RBF kernel, learned lengthscale) on standardised, maybe projected inputs."""

    name = "gp"

    def __init__(self, method: str = "auto", inducing: int = 256, dim: int | None = None, ard: bool = False,
                 epochs: int = 100, lr: float = 0.1, seed: int = 0):
        self.method = method
        self.inducing = inducing
        self.dim = dim
        self.ard = ard
        self.epochs = epochs
        self.lr = lr
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
        val = (X_val, np.searchsorted(self.classes_, y_val)) if X_val is not None and len(X_val) else None
        with torch.random.fork_rng(devices=[self.device_] if self.device_.type == "cuda" else []):
            torch.manual_seed(self.seed)  # gpytorch initialises and shuffles with torch's generator
            if self.method_ == "exact":
                self.model_ = self._build(Z.shape[1], train=(Z, self.targets_))
                self._train_exact(Z, val)
            else:
                self.model_ = self._build(Z.shape[1], inducing=self._kmeans(Z))
                self._train_svgp(Z, self.targets_, val)
        return self

    def _resolve_method(self, n: int, d: int) -> str:
        check_positive(inducing=self.inducing, dim=self.dim, epochs=self.epochs, lr=self.lr)
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
            likelihood = DirichletClassificationLikelihood(targets, learn_additional_noise=True)
            model = _DirichletGP(Z, likelihood.transformed_targets, likelihood, n_classes, ard_dims)
        else:
            model = _SVGP(inducing, n_classes, ard_dims)
            model.likelihood = SoftmaxLikelihood(num_classes=n_classes, mixing_weights=False)
        return model.to(self.device_)

    def _train_exact(self, Z: torch.Tensor, val) -> None:
        """Full-batch Adam on the exact marginal likelihood of the Dirichlet-transformed labels."""
        model = self.model_
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        with progress_bar("gp (exact)", self.epochs, unit="epoch") as advance, _cholesky():
            for _ in range(self.epochs):
                model.train()
                optimizer.zero_grad()
                loss = -mll(model(Z), model.likelihood.transformed_targets).sum()
                loss.backward()
                optimizer.step()
                advance(info=self._progress_info(loss.item(), val))
        model.eval()

    def _train_svgp(self, Z: torch.Tensor, targets: torch.Tensor, val) -> None:
        """Minibatch Adam on the variational ELBO of the softmax likelihood."""
        model = self.model_
        elbo = gpytorch.mlls.VariationalELBO(model.likelihood, model, num_data=len(Z))
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        with progress_bar("gp (svgp)", self.epochs, unit="epoch") as advance:
            for _ in range(self.epochs):
                model.train()
                total = 0.0
                for idx in torch.randperm(len(Z), device=Z.device).split(BATCH_SIZE):
                    optimizer.zero_grad()
                    loss = -elbo(model(Z[idx]), targets[idx])
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(idx)
                advance(info=self._progress_info(total / len(Z), val))
        model.eval()

    def _progress_info(self, loss: float, val) -> str:
        if val is None:
            return f"loss {loss:.3f}"
        accuracy = (self._predict(val[0])[0].argmax(1) == val[1]).mean()
        return f"loss {loss:.3f} val_acc {accuracy:.3f}"

    # --- prediction ------------------------------------------------------------------------------
    def _latent(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance of each class's latent function, both ``(n, n_classes)``."""
        self.model_.eval()
        with torch.no_grad(), _cholesky():
            dist = self.model_(Z)
        if self.method_ == "exact":  # a batch of one GP per class: (n_classes, n)
            return dist.mean.T, dist.variance.T
        return dist.mean, dist.variance

    def _predict(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities by Monte Carlo over the latent marginals (seeded), and latent variances."""
        check_is_fitted(self, "model_")
        eps = torch.randn(PREDICT_SAMPLES, 1, len(self.classes_),
                          generator=torch.Generator().manual_seed(self.seed)).to(self.device_)
        probas, variances = [], []
        for Z in self._inputs(X).split(BATCH_SIZE):
            mean, var = self._latent(Z)
            samples = mean + var.clamp_min(0).sqrt() * eps  # the same draws for every example
            probas.append(samples.softmax(-1).mean(0).cpu())
            variances.append(var.cpu())
        n_classes = len(self.classes_)
        return (torch.cat(probas).numpy() if probas else np.zeros((0, n_classes), np.float32),
                torch.cat(variances).numpy() if variances else np.zeros((0, n_classes), np.float32))

    def predict_proba(self, X) -> np.ndarray:
        return self._predict(X)[0]

    def uncertainty(self, X) -> dict[str, np.ndarray]:
        """Predictive entropy, and the latent posterior variance of the predicted class."""
        proba, variance = self._predict(X)
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
        self.method_, self.device_ = info["method"], resolve_device("auto")
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
        return {"method": self.method_}


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


def _cholesky():
    """Solve by Cholesky, never by conjugate gradients: exact, and deterministic at prediction."""
    return gpytorch.settings.max_cholesky_size(10 ** 9)
