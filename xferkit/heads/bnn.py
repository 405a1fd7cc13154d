"""Bayesian neural-network head: a factorised Gaussian posterior over the weights, fitted by the ELBO.

Variational inference as the lecture teaches it: q(w) = N(mu, sigma^2) per weight, sigma = softplus(rho),
samples w = mu + sigma * eps with eps ~ N(0, 1) (the reparameterisation gradient), the KL to the Gaussian
prior N(0, prior_std^2) in closed form, and the likelihood of a minibatch of B scaled by N / B.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted
from torch import nn

from xferkit.core.devices import resolve_device
from xferkit.core.errors import InvalidParameter
from xferkit.core.metrics import predictive_entropy
from xferkit.heads.base import SEED, ArraySpec, FeatureHead, ProgressCallback, draw_seed
from xferkit.heads.exportable import Standardised, constant

#: Examples per gradient step.
BATCH_SIZE = 128
#: Posterior std of every weight at the start: near a point estimate, the ELBO then widens it.
INIT_STD = 1e-3
#: One draw of every layer's (weight, bias).
Weights = list[tuple[torch.Tensor, torch.Tensor]]
#: ``epoch_end(epoch, val_nll) -> stop``: told each epoch's validation NLL; True stops training.
EpochEnd = Callable[[int, float], bool]
#: Weight draws behind each epoch's validation NLL: a few, in float32 (a learning curve to rank
#: trials by, at a fraction of the cost of a prediction's ``mc_samples``).
MONITOR_SAMPLES = 8


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, prior_std^2)) summed over the weights, in closed form."""
    return (math.log(prior_std) - sigma.log() + (sigma ** 2 + mu ** 2) / (2 * prior_std ** 2) - 0.5).sum()


class BayesianLinear(nn.Module):
    """The posterior of a linear layer's weights and biases: q = N(mu, softplus(rho)^2) for each."""

    def __init__(self, n_in: int, n_out: int, prior_std: float, generator: torch.Generator):
        super().__init__()
        self.prior_std = prior_std
        device, rho = generator.device, math.log(math.expm1(INIT_STD))
        self.weight_mu = nn.Parameter(torch.randn(n_out, n_in, generator=generator, device=device)
                                      / math.sqrt(n_in))
        self.weight_rho = nn.Parameter(torch.full((n_out, n_in), rho, device=device))
        self.bias_mu = nn.Parameter(torch.zeros(n_out, device=device))
        self.bias_rho = nn.Parameter(torch.full((n_out,), rho, device=device))

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw of (weight, bias) from q."""
        return (_reparameterise(self.weight_mu, self.weight_rho, generator),
                _reparameterise(self.bias_mu, self.bias_rho, generator))

    def kl(self) -> torch.Tensor:
        return (gaussian_kl(self.weight_mu, F.softplus(self.weight_rho), self.prior_std)
                + gaussian_kl(self.bias_mu, F.softplus(self.bias_rho), self.prior_std))


def _reparameterise(mu: torch.Tensor, rho: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """w = mu + sigma * eps: a sample of q(w) through which gradients reach mu and rho (eps drawn where
    *generator* lives)."""
    eps = torch.randn(mu.shape, generator=generator, device=generator.device).to(mu.device)
    return mu + F.softplus(rho) * eps


class BayesianMLP(nn.Module):
    """Bayesian linear layers with ReLU between them; one weight sample per call, shared by the batch."""

    def __init__(self, sizes: list[int], prior_std: float, generator: torch.Generator):
        super().__init__()
        self.layers = nn.ModuleList(BayesianLinear(n_in, n_out, prior_std, generator)
                                    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.logits(x, self.sample(generator))

    def sample(self, generator: torch.Generator) -> Weights:
        """One draw of every layer's weights."""
        return [layer.sample(generator) for layer in self.layers]

    @staticmethod
    def logits(x: torch.Tensor, weights: Weights) -> torch.Tensor:
        """The network's output for inputs *x* under one draw of its *weights*."""
        for i, (weight, bias) in enumerate(weights):
            x = F.linear(x if i == 0 else F.relu(x), weight, bias)
        return x

    def kl(self) -> torch.Tensor:
        return sum(layer.kl() for layer in self.layers)


class BNNHead(FeatureHead):
    """Mean-field variational Bayesian head (one layer, or one hidden ReLU layer) on standardised features.

    Parameters
    ----------
    hidden : int, default=0
        Units of the hidden ReLU layer; 0 makes the head a single Bayesian linear layer.
    prior_std : float, default=1.0
        Standard deviation of the Gaussian prior on every weight and bias.
    mc_samples : int, default=32
        Weight samples averaged at prediction.
    epochs : int, default=200
        Passes over the training data (Adam, cosine-decayed learning rate).
    lr : float, default=0.01
        Adam's initial learning rate.
    random_state : int or None, default=None
        Seed of the initialisation, minibatches and weight samples (the same samples at every prediction).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels seen in fit, in the order of predict_proba's columns.
    n_features_in_ : int
        Number of features seen in fit.
    mean_, scale_ : ndarray of shape (n_features_in_,)
        Per-feature mean and standard deviation used to standardise X.
    net_ : BayesianMLP
        The variational posterior over the network's weights.
    seed_ : int
        Seed drawn from random_state at fit, for training and for the prediction-time weight samples.
    device_ : torch.device
        Where the network computes.
    """

    name = "bnn"
    _parameter_constraints = {
        "hidden": [Interval(Integral, 0, 1 << 14, closed="both")],
        "prior_std": [Interval(Real, 0, None, closed="neither")],
        "mc_samples": [Interval(Integral, 1, 10_000, closed="both")],
        "epochs": [Interval(Integral, 1, 100_000, closed="both")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "random_state": ["random_state"],
    }
    _fitted_scalars = {"seed_": SEED}

    def __init__(self, hidden: int = 0, *, prior_std: float = 1.0, mc_samples: int = 32, epochs: int = 200,
                 lr: float = 0.01, random_state: int | None = None):
        self.hidden = hidden
        self.prior_std = prior_std
        self.mc_samples = mc_samples
        self.epochs = epochs
        self.lr = lr
        self.random_state = random_state

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"hidden": trial.suggest_categorical("hidden", [0, 64, 256]),
                "prior_std": trial.suggest_float("prior_std", 0.03, 3.0, log=True),
                "lr": trial.suggest_float("lr", 1e-3, 3e-2, log=True)}

    def fit(self, X, y, *, progress: ProgressCallback | None = None, epoch_end: EpochEnd | None = None,
            validation: tuple | None = None) -> BNNHead:
        """As :meth:`FeatureHead.fit`; given held-out ``validation=(X_val, y_val)``,
        ``epoch_end(epoch, val_nll)`` hears the posterior predictive NLL there (``MONITOR_SAMPLES`` weight
        draws) after every epoch, and True from it stops training.

        The head never holds out data itself (it has no ``validation_fraction``): tuning passes its split.
        """
        if (epoch_end is None) != (validation is None):
            raise InvalidParameter("epoch_end needs validation=(X_val, y_val) to measure its NLL on, and "
                                   "validation is only used for epoch_end.")
        self._monitor = (epoch_end, validation)  # read by _fit, which FeatureHead.fit calls
        try:
            return super().fit(X, y, progress=progress)
        finally:
            del self._monitor

    def _fit(self, X: np.ndarray, y: np.ndarray, progress: ProgressCallback) -> None:
        self.seed_ = draw_seed(self.random_state)
        self.device_ = resolve_device("auto")
        generator = torch.Generator(self.device_).manual_seed(self.seed_)
        self.net_ = self._build(X.shape[1], generator)
        inputs = torch.from_numpy(self._standardised(X, np.float32)).to(self.device_)
        self._train(inputs, torch.from_numpy(y).to(self.device_), generator, progress, self._stopper())

    def _stopper(self) -> Callable[[int], bool]:
        """``stop(epoch)``: ``epoch_end``'s answer to the validation NLL the posterior has now reached."""
        epoch_end, validation = self._monitor
        if epoch_end is None:
            return lambda epoch: False
        X_val, y_val = validation
        index = np.searchsorted(self.classes_, y_val).clip(max=len(self.classes_) - 1)
        if len(y_val) != len(X_val) or not np.array_equal(self.classes_[index], np.asarray(y_val)):
            raise InvalidParameter("validation=(X_val, y_val) needs one label per row, each a class of y.")
        inputs = torch.from_numpy(self._standardised(self._validated(X_val), np.float32)).to(self.device_)
        target, generator = torch.from_numpy(index).to(self.device_), torch.Generator(self.device_)

        def stop(epoch: int) -> bool:
            generator.manual_seed(self.seed_)  # the same noise every epoch: only the posterior moves
            with torch.no_grad():
                proba = torch.stack([self.net_(inputs, generator).softmax(-1)
                                     for _ in range(MONITOR_SAMPLES)]).mean(0)
            return epoch_end(epoch, F.nll_loss(proba.clamp_min(1e-12).log(), target).item())
        return stop

    def _build(self, n_features: int, generator: torch.Generator) -> BayesianMLP:
        sizes = [n_features, *([self.hidden] if self.hidden else []), len(self.classes_)]
        return BayesianMLP(sizes, self.prior_std, generator)

    def _train(self, X: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
               progress: ProgressCallback, stop: Callable[[int], bool]) -> None:
        """Adam, cosine-decayed, on the negative ELBO = N/B * (minibatch NLL) + KL(q || prior).

        After each epoch, ``stop(epoch)`` may end training early.
        """
        n = len(X)
        optimizer = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs)
        for epoch in range(1, self.epochs + 1):
            neg_elbo = 0.0
            for idx in torch.randperm(n, generator=generator, device=X.device).split(BATCH_SIZE):
                log_likelihood = -F.cross_entropy(self.net_(X[idx], generator), y[idx], reduction="sum")
                elbo = n / len(idx) * log_likelihood - self.net_.kl()
                optimizer.zero_grad()
                (-elbo / n).backward()
                optimizer.step()
                neg_elbo += -elbo.item() * len(idx) / n
            schedule.step()
            progress(epoch, self.epochs, f"-elbo/n {neg_elbo / n:.3f}")
            if stop(epoch):
                break

    def _sample_proba(self, X) -> np.ndarray:
        """Softmax outputs under ``mc_samples`` weight draws, ``(S, n, n_classes)``: the same draws always.

        Each draw is made in float32, as in training, and applied in float64.
        """
        inputs = torch.from_numpy(self._standardised(self._validated(X))).to(self.device_)
        with torch.no_grad():
            samples = [self.net_.logits(inputs, [(w.double(), b.double()) for w, b in weights]).softmax(-1)
                       for weights in self.weight_samples()]
        return torch.stack(samples).cpu().numpy()

    def weight_samples(self) -> list[Weights]:
        """The ``mc_samples`` weight draws every prediction averages over (seeded: the same each time).

        Drawn by a CPU generator whatever the device, so a saved model predicts the same on a GPU
        machine as on a CPU one (CUDA's generator gives other numbers for the same seed).
        """
        generator = torch.Generator().manual_seed(self.seed_)
        with torch.no_grad():
            return [self.net_.sample(generator) for _ in range(self.mc_samples)]

    def predict_proba(self, X) -> np.ndarray:
        """The posterior predictive: softmax averaged over weight samples."""
        return self._sample_proba(X).mean(0)

    def uncertainty(self, X) -> dict[str, np.ndarray]:
        """Predictive entropy, and its epistemic part: the mutual information between label and weights."""
        samples = self._sample_proba(X)
        entropy = predictive_entropy(samples.mean(0))
        expected = np.mean([predictive_entropy(p) for p in samples], axis=0)
        return {"entropy": entropy, "mutual_information": entropy - expected}

    def torch_modules(self) -> dict[str, nn.Module]:
        """The predictive with ``predict_proba``'s weight samples baked in, and the mean weights + probit.

        The second is smaller (no samples) but approximates: the exporter measures both against
        ``predict_proba`` and keeps the closer.
        """
        check_is_fitted(self)
        layers = [(layer.weight_mu, F.softplus(layer.weight_rho), layer.bias_mu, F.softplus(layer.bias_rho))
                  for layer in self.net_.layers]
        return {"mc samples": Standardised(self.mean_, self.scale_, _SampledMLP(self.weight_samples())),
                "mean weights + probit": Standardised(self.mean_, self.scale_, _ProbitMLP(layers))}

    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        return {f"net.{k}": v.cpu().numpy() for k, v in self.net_.state_dict().items()}

    def _array_specs(self, arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        """Each layer's posterior: means and rhos of weights ``(out, in)`` and biases ``(out,)``, float32."""
        sizes = [self.n_features_in_, *([self.hidden] if self.hidden else []), len(self.classes_)]
        return {f"net.layers.{i}.{part}_{stat}": ArraySpec(shape, np.float32)
                for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
                for part, shape in (("weight", (n_out, n_in)), ("bias", (n_out,))) for stat in ("mu", "rho")}

    def _restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.device_ = resolve_device("auto")
        self.net_ = self._build(self.n_features_in_, torch.Generator(self.device_))
        self.net_.load_state_dict({k.removeprefix("net."): torch.from_numpy(v) for k, v in arrays.items()})


class _SampledMLP(nn.Module):
    """The softmax of the MLP averaged over fixed weight samples, on standardised features."""

    def __init__(self, samples: list[Weights]):
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(constant(torch.stack([draw[i][part] for draw in samples])), requires_grad=False)
            for i in range(len(samples[0])) for part in (0, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z.unsqueeze(0)  # (1, n, d): broadcast against the samples
        for i in range(0, len(self.weights), 2):
            weight, bias = self.weights[i], self.weights[i + 1]
            x = (x if i == 0 else F.relu(x)) @ weight.transpose(1, 2) + bias.unsqueeze(1)
        return x.softmax(-1).mean(0)


class _ProbitMLP(nn.Module):
    """Mean weights up to the last layer, whose Gaussian logits are squashed by the probit approximation.

    With mean-field weights the logits are Gaussian given the last layer's input ``h``: mean
    ``h @ mu.T + mu_b`` and variance ``h**2 @ sigma.T**2 + sigma_b**2``; ``softmax(mean / sqrt(1 +
    pi var / 8))`` approximates the softmax averaged over them (MacKay 1992).
    """

    def __init__(self, layers: list[tuple[torch.Tensor, ...]]):
        super().__init__()
        self.layers = nn.ParameterList(nn.Parameter(constant(t), requires_grad=False)
                                       for layer in layers for t in layer)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, n = z, len(self.layers) // 4
        for i in range(n - 1):
            h = F.relu(F.linear(h, self.layers[4 * i], self.layers[4 * i + 2]))
        weight_mu, weight_sigma, bias_mu, bias_sigma = self.layers[4 * (n - 1):]
        mean = F.linear(h, weight_mu, bias_mu)
        var = (h ** 2) @ (weight_sigma ** 2).T + bias_sigma ** 2
        return torch.softmax(mean / torch.sqrt(1 + math.pi * var / 8), dim=-1)
