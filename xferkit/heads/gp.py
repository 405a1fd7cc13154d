"""Gaussian-process classifier on features: exact Dirichlet GP for small data, SVGP for large data.

On CNN features both GPs rank classes well but are under-confident: in hundreds of dimensions
every point is far from every other, so the latent posterior variance stays large and the
softmax averaged over it flattens. A temperature on the predictive log-probabilities corrects
this without changing any prediction's class. The exact GP fits it to its own closed-form
leave-one-out predictions of the training set (no held-out data needed); an SVGP keeps 1 unless
given one (a validation-set temperature can be applied to its probabilities afterwards).
"""

from __future__ import annotations

import math
from enum import Enum
from numbers import Integral, Real

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
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from xferkit.core.calibration import fit_temperature, temper
from xferkit.core.devices import resolve_device
from xferkit.core.errors import InvalidParameter
from xferkit.core.metrics import predictive_entropy
from xferkit.heads.base import (
    SEED,
    ArraySpec,
    FeatureHead,
    ProgressCallback,
    draw_seed,
    expect_arrays,
    require,
)
from xferkit.heads.exportable import Standardised, tempered

#: ``method="auto"`` fits the exact GP up to this many training examples, an SVGP beyond.
EXACT_MAX_N = 2000
#: Latent samples per example when integrating the softmax over the GP posterior.
PREDICT_SAMPLES = 256
#: SVGP minibatch size; also the chunk size for prediction.
BATCH_SIZE = 256
#: Rows (at least 8 per inducing point) of a seeded sample that k-means places the inducing points on:
#: on all of 50 000 x 512 it took 4x as long for a 2 % lower within-cluster distance over all rows.
KMEANS_ROWS = 16384
#: The prefix of the SVGP's inducing points and variational parameters in its state dict.
SVGP_STATE = "model.variational_strategy.base_variational_strategy."
#: SVGP training stops once the mean epoch loss of the last WINDOW epochs is within this relative
#: amount of the WINDOW before (the exact GP's L-BFGS has its own convergence test).
CONVERGED, WINDOW = 1e-3, 10


class GPMethod(str, Enum):
    """Which GP to fit: ``auto`` is exact up to EXACT_MAX_N training examples, an SVGP beyond."""

    auto = "auto"
    exact = "exact"
    svgp = "svgp"


class GPHead(FeatureHead):
    """One latent GP per class (RBF kernel, learned lengthscale) on standardised, maybe projected features.

    Parameters
    ----------
    method : {"auto", "exact", "svgp"}, default="auto"
        Exact Dirichlet GP or sparse variational GP; auto is exact up to 2000 training examples.
    inducing : int, default=256
        Inducing points of the SVGP (k-means centres of a sample of the training features), at most n.
    dim : int or None, default=None
        Whitened principal directions to project the features onto first; None keeps them all.
    ard : bool, default=False
        Learn one RBF lengthscale per input dimension instead of one shared lengthscale.
    epochs : int, default=100
        Most passes over the data (exact: L-BFGS evaluations); training stops sooner once converged.
    lr : float, default=0.1
        The SVGP's Adam learning rate.
    alpha_epsilon : float, default=0.01
        Pseudo-count of the exact GP's Dirichlet label transform (Milios et al. 2018).
    temperature : float or None, default=None
        Temperature on the predictive; None fits it to leave-one-out predictions (exact) or keeps 1 (SVGP).
    random_state : int or None, default=None
        Seed of the initialisation, minibatches, k-means and the Monte Carlo draws at prediction.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels seen in fit, in the order of predict_proba's columns.
    n_features_in_ : int
        Number of features seen in fit.
    mean_, scale_ : ndarray of shape (n_features_in_,)
        Per-feature mean and standard deviation used to standardise X.
    projection_ : ndarray of shape (n_features_in_, dim) or None
        Whitening projection onto the top principal directions, when dim is given.
    method_ : str
        The GP that was fitted: exact or svgp.
    model_ : gpytorch model
        The fitted GP (float64; the exact one holds its training inputs).
    targets_ : torch.Tensor of shape (n_samples,)
        Class indices of the training examples.
    temperature_ : float
        The temperature applied to the predictive probabilities.
    epochs_ : int
        Passes over the data that training took.
    seed_ : int
        Seed drawn from random_state at fit, for training and for the prediction-time draws.
    device_ : torch.device
        Where the GP computes.
    """

    name = "gp"
    _parameter_constraints = {
        "method": [StrOptions({method.value for method in GPMethod})],
        "inducing": [Interval(Integral, 1, 20_000, closed="both")],
        "dim": [Interval(Integral, 1, None, closed="left"), None],
        "ard": ["boolean"],
        "epochs": [Interval(Integral, 1, 100_000, closed="both")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "alpha_epsilon": [Interval(Real, 0, None, closed="neither")],
        "temperature": [Interval(Real, 0, None, closed="neither"), None],
        "random_state": ["random_state"],
    }
    _fitted_scalars = {
        "method_": [StrOptions({GPMethod.exact.value, GPMethod.svgp.value})],
        "temperature_": [Interval(Real, 0, None, closed="neither")],
        "epochs_": [Interval(Integral, 0, None, closed="left")],
        "seed_": SEED,
    }

    def __init__(self, method: str = "auto", *, inducing: int = 256, dim: int | None = None,
                 ard: bool = False, epochs: int = 100, lr: float = 0.1, alpha_epsilon: float = 0.01,
                 temperature: float | None = None, random_state: int | None = None):
        self.method = method
        self.inducing = inducing
        self.dim = dim
        self.ard = ard
        self.epochs = epochs
        self.lr = lr
        self.alpha_epsilon = alpha_epsilon
        self.temperature = temperature
        self.random_state = random_state

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"lr": trial.suggest_float("lr", 0.01, 0.3, log=True),
                "ard": trial.suggest_categorical("ard", [False, True])}

    def _fit(self, X: np.ndarray, y: np.ndarray, progress: ProgressCallback) -> None:
        self.method_ = self._resolve_method(*X.shape)
        self.seed_ = draw_seed(self.random_state)
        self.device_ = resolve_device("auto")
        self.projection_ = self._projection(X) if self.dim is not None else None
        Z = self._inputs(X, np.float32)
        self.targets_ = torch.from_numpy(y).to(self.device_)
        with torch.random.fork_rng(devices=[self.device_] if self.device_.type == "cuda" else []):
            torch.manual_seed(self.seed_)  # gpytorch initialises and shuffles with torch's generator
            if self.method_ == "exact":
                self.model_ = self._build(Z.shape[1], train=(Z, self.targets_))
                self._train_exact(Z, progress)
            else:
                self.model_ = self._build(Z.shape[1], inducing=self._kmeans(Z))
                self._train_svgp(Z, self.targets_, progress)
        self.model_.double().eval()  # trained in float32, predicts in float64: no row depends on another
        self.temperature_ = self._fit_temperature()

    def _resolve_method(self, n: int, d: int) -> str:
        """The GP to fit for *n* examples of *d* features; data-dependent limits of dim and inducing."""
        if self.dim is not None and self.dim > min(n - 1, d):
            raise InvalidParameter(f"dim={self.dim} is too large: the projection needs dim < n ({n}) and "
                                   f"dim <= the number of features ({d}); lower dim or leave it unset.")
        method = GPMethod(self.method)
        if method == GPMethod.auto:
            method = GPMethod.exact if n <= EXACT_MAX_N else GPMethod.svgp
        if method == GPMethod.svgp and self.inducing > n:
            raise InvalidParameter(f"inducing={self.inducing} exceeds the {n} training examples; "
                                   "use at most n inducing points.")
        return method.value

    # --- inputs: standardise, optionally whiten-project to ``dim`` principal directions, then divide
    # by sqrt(dims) so that typical distances are ~1 and lengthscales start (and move) at that scale.
    def _projection(self, X: np.ndarray) -> np.ndarray:
        """Columns: the top ``dim`` principal directions of the standardised *X*, scaled to unit variance."""
        Z = self._standardised(X)
        eigval, eigvec = np.linalg.eigh(Z.T @ Z / (len(Z) - 1))
        top = np.argsort(eigval)[::-1][:self.dim]
        return eigvec[:, top] / np.sqrt(np.clip(eigval[top], 1e-12, None))

    def _inputs(self, X: np.ndarray, dtype: type = np.float64) -> torch.Tensor:
        """The GP's inputs for features *X*: float32 to train on, float64 to predict."""
        Z = self._standardised(X, dtype)
        if self.projection_ is not None:
            Z = Z @ self.projection_.astype(dtype)
        Z /= math.sqrt(Z.shape[1])
        return torch.from_numpy(Z).to(self.device_)

    def _kmeans(self, Z: torch.Tensor) -> torch.Tensor:
        """The inducing points: k-means centres of a seeded sample of ``KMEANS_ROWS`` rows (all, if fewer)."""
        rows = min(len(Z), max(KMEANS_ROWS, 8 * self.inducing))
        sample = np.sort(np.random.default_rng(self.seed_).choice(len(Z), rows, replace=False))
        points = Z[torch.from_numpy(sample).to(Z.device)].cpu().numpy()
        km = KMeans(self.inducing, n_init=1, random_state=self.seed_).fit(points)
        return torch.from_numpy(km.cluster_centers_).float()

    # --- models ----------------------------------------------------------------------------------
    def _build(self, d: int, train: tuple[torch.Tensor, torch.Tensor] | None = None,
               inducing: torch.Tensor | None = None, device: torch.device | None = None):
        """The exact model conditions on *train* (inputs, class indices); the SVGP starts at *inducing*.

        It lives on *device*, by default the head's own.
        """
        n_classes, ard_dims = len(self.classes_), d if self.ard else None
        if self.method_ == "exact":
            Z, targets = train
            likelihood = DirichletClassificationLikelihood(targets, alpha_epsilon=self.alpha_epsilon,
                                                           learn_additional_noise=True)
            model = _DirichletGP(Z, likelihood.transformed_targets, likelihood, n_classes, ard_dims)
        else:
            model = _SVGP(inducing, n_classes, ard_dims)
            model.likelihood = SoftmaxLikelihood(num_classes=n_classes, mixing_weights=False)
        return model.to(device or self.device_)

    def _train_exact(self, Z: torch.Tensor, progress: ProgressCallback) -> None:
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
        with _cholesky():
            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = -mll(model(Z), model.likelihood.transformed_targets).sum()
                loss.backward()
                losses.append(loss.item())
                progress(len(losses), max(self.epochs, len(losses)), f"loss {losses[-1]:.3f}")
                return loss
            optimizer.step(closure)
        self.epochs_ = len(losses)

    def _train_svgp(self, Z: torch.Tensor, targets: torch.Tensor, progress: ProgressCallback) -> None:
        """Minibatch Adam on the variational ELBO of the softmax likelihood, until it stops improving."""
        model = self.model_
        elbo = gpytorch.mlls.VariationalELBO(model.likelihood, model, num_data=len(Z))
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        losses: list[float] = []
        model.train()
        for epoch in range(1, self.epochs + 1):
            total = 0.0
            for idx in torch.randperm(len(Z), device=Z.device).split(BATCH_SIZE):
                optimizer.zero_grad()
                loss = -elbo(model(Z[idx]), targets[idx])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            losses.append(total / len(Z))
            progress(epoch, self.epochs, f"loss {losses[-1]:.3f}")
            if _plateaued(losses):
                break
        self.epochs_ = len(losses)

    # --- calibration -----------------------------------------------------------------------------
    def _fit_temperature(self) -> float:
        """The given temperature, else (exact GP) the most probable one given leave-one-out predictions."""
        if self.temperature is not None:
            return float(self.temperature)
        if self.method_ == "svgp":
            return 1.0
        return fit_temperature(self._mc_softmax(*self._leave_one_out()).numpy(), self.targets_.cpu().numpy())

    def _leave_one_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance, ``(n, n_classes)``, of each training example given all the others.

        Closed form for a GP (Rasmussen & Williams, eq. 5.12): with ``K`` the prior covariance plus
        label noise and ``r`` the targets minus the prior mean, ``mu_i = y_i - (K^-1 r)_i / (K^-1)_ii``
        and the noisy variance is ``1 / (K^-1)_ii``; one class at a time, in float64.
        """
        model, likelihood = self.model_, self.model_.likelihood
        Z = model.train_inputs[0]
        with torch.no_grad():
            base = model.covar_module.base_kernel(Z).to_dense()
            scales = model.covar_module.outputscale
            noises = likelihood.noise + likelihood.second_noise
            targets = model.train_targets
            residuals = targets - model.mean_module(Z)
        means, variances = [], []
        for scale, noise, target, residual in zip(scales, noises, targets, residuals, strict=True):
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(scale * base + torch.diag(noise)))
            precision = inverse.diagonal()
            means.append(target - inverse @ residual / precision)
            variances.append((1 / precision - noise).clamp_min(0))
        return torch.stack(means, 1), torch.stack(variances, 1)

    # --- prediction ------------------------------------------------------------------------------
    def _latent(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance of each class's latent function, both ``(n, n_classes)``."""
        with torch.no_grad(), _cholesky(), gpytorch.settings.debug(False):  # no warning on training inputs
            dist = self.model_(Z)
        if self.method_ == "exact":  # a batch of one GP per class: (n_classes, n)
            return dist.mean.T, dist.variance.T
        return dist.mean, dist.variance

    def _mc_softmax(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """The softmax averaged over the latent marginals by Monte Carlo (seeded, the same draws for all)."""
        eps = self._draws(mean.dtype).to(mean.device)
        return torch.cat([(m + v.clamp_min(0).sqrt() * eps).softmax(-1).mean(0).cpu()
                          for m, v in zip(mean.split(BATCH_SIZE), var.split(BATCH_SIZE), strict=True)])

    def _draws(self, dtype: torch.dtype) -> torch.Tensor:
        """The standard normal draws ``(PREDICT_SAMPLES, 1, n_classes)`` every prediction uses (seeded)."""
        return torch.randn(PREDICT_SAMPLES, 1, len(self.classes_), dtype=dtype,
                           generator=torch.Generator().manual_seed(self.seed_))

    def _predict(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Tempered probabilities and latent variances, both ``(n, n_classes)``."""
        latents = [self._latent(Z) for Z in self._inputs(self._validated(X)).split(BATCH_SIZE)]
        mean, var = (torch.cat(parts) for parts in zip(*latents, strict=True))
        return temper(self._mc_softmax(mean, var).numpy(), self.temperature_), var.cpu().numpy()

    def predict_proba(self, X) -> np.ndarray:
        return self._predict(X)[0]

    def uncertainty(self, X) -> dict[str, np.ndarray]:
        """Predictive entropy, and the latent posterior variance of the predicted class."""
        proba, variance = self._predict(X)
        return {"entropy": predictive_entropy(proba),
                "variance": variance[np.arange(len(proba)), proba.argmax(1)]}

    def torch_modules(self) -> dict[str, nn.Module]:
        """The GP's predictive in closed form, over its stored training set or the SVGP's inducing points."""
        check_is_fitted(self)
        model, terms = self.model_, self._exact_terms if self.method_ == "exact" else self._svgp_terms
        with torch.no_grad(), _cholesky():
            points, alpha, inverse, jitter = terms()
            lengthscale = model.covar_module.base_kernel.lengthscale.reshape(-1)
            gp = _ClosedForm(self.projection_, points / lengthscale, lengthscale,
                             model.covar_module.outputscale, model.mean_module.constant.reshape(-1), alpha,
                             inverse, jitter, self._draws(torch.float64), self.temperature_)
        return {"closed form": Standardised(self.mean_, self.scale_, gp)}

    def _exact_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Training inputs Z, ``alpha = K^-1 (y - m)`` and ``K^-1`` per class, no jitter (``_ClosedForm``)."""
        model = self.model_
        Z = model.train_inputs[0]
        # the training covariance with label noise exactly as gpytorch's prediction conditions on it
        noisy = model.likelihood(model.forward(Z), Z).covariance_matrix
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(noisy))
        residual = model.train_targets - model.mean_module.constant.reshape(-1, 1)
        return Z, (inverse @ residual.unsqueeze(-1)).squeeze(-1), inverse, 0.0

    def _svgp_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Inducing points U, ``L^-T m`` and ``-L^-T (S - I) L^-1`` per class (``L L^T = K_UU + jitter``).

        gpytorch's whitened variational strategy: mean ``m_c + k(x, U) L^-T m``, variance
        ``s_c + jitter + k(x, U) L^-T (S - I) L^-1 k(U, x)``.
        """
        strategy = self.model_.variational_strategy.base_variational_strategy
        distribution = strategy._variational_distribution
        U, jitter = strategy.inducing_points, strategy.jitter_val
        eye = torch.eye(len(U), dtype=U.dtype, device=U.device)
        L = torch.linalg.cholesky(self.model_.covar_module(U).to_dense() + jitter * eye)
        L_inv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
        chol = distribution.chol_variational_covar.tril()
        alpha = (L_inv.mT @ distribution.variational_mean.unsqueeze(-1)).squeeze(-1)
        return U, alpha, -(L_inv.mT @ (chol @ chol.mT - eye) @ L_inv), float(jitter)

    # --- persistence -----------------------------------------------------------------------------
    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"model.{k}": v.cpu().numpy() for k, v in self.model_.state_dict().items()}
        if self.projection_ is not None:
            arrays["projection"] = self.projection_
        if self.method_ == "exact":  # the exact posterior conditions on the training set itself
            arrays.update({"train_inputs": self.model_.train_inputs[0].cpu().numpy(),
                           "train_targets": self.targets_.cpu().numpy()})
        return arrays

    def _array_specs(self, arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        """The projection, the training set (exact) or the inducing points (SVGP), and the GP's state.

        The arrays that carry the large sizes (n, dim, inducing) are checked first; the GP built for
        the shapes of the rest is then a small one, on the CPU.
        """
        k, d = len(self.classes_), self.n_features_in_ if self.dim is None else self.dim
        sized = {"projection": ArraySpec((self.n_features_in_, d))} if self.dim is not None else {}
        if self.method_ == "exact":
            expect_arrays(arrays, {"train_targets": ArraySpec((None,), np.int64)}, complete=False)
            targets = arrays["train_targets"]
            require(np.array_equal(np.unique(targets), np.arange(k)),
                    f"array 'train_targets' must hold every class index from 0 to {k - 1} and no other")
            sized |= {"train_inputs": ArraySpec((len(targets), d)),
                      "train_targets": ArraySpec(targets.shape, np.int64)}
            small = {"train": (torch.zeros(k, d), torch.arange(k))}
        else:
            m = self.inducing
            sized |= {f"{SVGP_STATE}inducing_points": ArraySpec((m, d)),
                      f"{SVGP_STATE}_variational_distribution.variational_mean": ArraySpec((k, m)),
                      f"{SVGP_STATE}_variational_distribution.chol_variational_covar": ArraySpec((k, m, m))}
            small = {"inducing": torch.zeros(1, d)}
        expect_arrays(arrays, sized, complete=False)
        template = self._build(d, **small, device=torch.device("cpu")).double()
        saved = {f"model.{key}": np.ascontiguousarray(value.numpy())  # as save writes them: at least 1-D
                 for key, value in template.state_dict().items()}
        state = {key: ArraySpec(value.shape, value.dtype, bool(np.isfinite(value).all()))
                 for key, value in saved.items()}
        return {**state, **sized}

    def _restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.device_ = resolve_device("auto")
        self.projection_ = arrays.pop("projection", None)
        d = len(self.mean_) if self.projection_ is None else self.projection_.shape[1]
        if self.method_ == "exact":
            self.targets_ = torch.from_numpy(arrays.pop("train_targets")).to(self.device_)
            inputs = torch.from_numpy(arrays.pop("train_inputs")).to(self.device_)
            self.model_ = self._build(d, train=(inputs, self.targets_))
        else:
            self.model_ = self._build(d, inducing=torch.zeros(self.inducing, d))
        self.model_.double()
        self.model_.load_state_dict({key.removeprefix("model."): torch.from_numpy(value)
                                     for key, value in arrays.items()})
        self.model_.eval()


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


class _ClosedForm(nn.Module):
    """The GP's tempered Monte Carlo softmax in float64 torch, on standardised features (as ``_predict``).

    Per class ``c``: latent mean ``m_c + k_c(x, Z) alpha_c`` and variance ``s_c + jitter - k_c(x, Z) A_c
    k_c(Z, x)``; exact GP: Z the training inputs, ``A = K^-1`` with the label noise; SVGP: Z the inducing
    points (see ``GPHead._svgp_terms``).
    """

    def __init__(self, projection, Z_scaled, lengthscale, scales, means, alpha, inverse, jitter, draws,
                 temperature):
        super().__init__()
        self.register_buffer("projection", None if projection is None else torch.tensor(projection).double())
        for name, value in (("Z", Z_scaled), ("lengthscale", lengthscale), ("scales", scales),
                            ("means", means), ("alpha", alpha), ("inverse", inverse), ("draws", draws)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float64).cpu())
        self.jitter, self.temperature = float(jitter), float(temperature)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.double()  # float32 loses the latent variance to cancellation near the training points
        if self.projection is not None:
            z = z @ self.projection
        x = z / math.sqrt(z.shape[1]) / self.lengthscale
        squared = (x ** 2).sum(1, keepdim=True) - 2 * x @ self.Z.T + (self.Z ** 2).sum(1)
        k = self.scales[:, None, None] * torch.exp(-0.5 * squared.clamp_min(0))  # (classes, n, train)
        mean = self.means[:, None] + (k @ self.alpha.unsqueeze(-1)).squeeze(-1)
        var = self.scales[:, None] + self.jitter - ((k @ self.inverse) * k).sum(-1)
        latent = mean.T + var.T.clamp_min(0).sqrt() * self.draws  # (samples, n, classes)
        return tempered(latent.softmax(-1).mean(0), self.temperature).float()


def _kernel(n_classes: int, ard_dims: int | None) -> ScaleKernel:
    """RBF lengthscale(s) shared by the classes (one distance computation), an output scale per class."""
    return ScaleKernel(RBFKernel(ard_num_dims=ard_dims), batch_shape=torch.Size([n_classes]))


def _plateaued(losses: list[float]) -> bool:
    """Whether the last WINDOW epochs' mean loss is within CONVERGED (relative) of the WINDOW before."""
    if len(losses) < 2 * WINDOW:
        return False
    before, recent = np.mean(losses[-2 * WINDOW:-WINDOW]), np.mean(losses[-WINDOW:])
    return before - recent < CONVERGED * abs(recent)


def _cholesky():
    """Solve by Cholesky, never by conjugate gradients: exact, and deterministic at prediction."""
    return gpytorch.settings.max_cholesky_size(10 ** 9)
