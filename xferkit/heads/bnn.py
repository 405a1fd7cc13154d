"""Bayesian neural-network head: a factorised Gaussian posterior over the weights, fitted by the ELBO.

Variational inference as the lecture teaches it: q(w) = N(mu, sigma^2) per weight, sigma = softplus(rho),
samples w = mu + sigma * eps with eps ~ N(0, 1) (the reparameterisation gradient), the KL to the Gaussian
prior N(0, prior_std^2) in closed form, and the likelihood of a minibatch of B scaled by N / B.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted
from torch import nn

from xferkit.devices import resolve_device
from xferkit.errors import XferkitError
from xferkit.heads.base import Head, check_positive, predictive_entropy
from xferkit.progress import progress_bar

#: Examples per gradient step (and per prediction chunk).
BATCH_SIZE = 128
#: Posterior std of every weight at the start: near a point estimate, the ELBO then widens it.
INIT_STD = 1e-3


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, prior_std^2)) summed over the weights, in closed form."""
    return (math.log(prior_std) - sigma.log() + (sigma ** 2 + mu ** 2) / (2 * prior_std ** 2) - 0.5).sum()


class BayesianLinear(nn.Module):
    """A linear layer whose weights and biases are drawn from q = N(mu, softplus(rho)^2) on every call."""

    def __init__(self, n_in: int, n_out: int, prior_std: float, generator: torch.Generator):
        super().__init__()
        self.prior_std = prior_std
        device, rho = generator.device, math.log(math.expm1(INIT_STD))
        self.weight_mu = nn.Parameter(torch.randn(n_out, n_in, generator=generator, device=device)
                                      / math.sqrt(n_in))
        self.weight_rho = nn.Parameter(torch.full((n_out, n_in), rho, device=device))
        self.bias_mu = nn.Parameter(torch.zeros(n_out, device=device))
        self.bias_rho = nn.Parameter(torch.full((n_out,), rho, device=device))

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        weight = _reparameterise(self.weight_mu, self.weight_rho, generator)
        bias = _reparameterise(self.bias_mu, self.bias_rho, generator)
        return F.linear(x, weight, bias)

    def kl(self) -> torch.Tensor:
        return (gaussian_kl(self.weight_mu, F.softplus(self.weight_rho), self.prior_std)
                + gaussian_kl(self.bias_mu, F.softplus(self.bias_rho), self.prior_std))


def _reparameterise(mu: torch.Tensor, rho: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """w = mu + sigma * eps: a sample of q(w) through which gradients reach mu and rho."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device)
    return mu + F.softplus(rho) * eps


class BayesianMLP(nn.Module):
    """Bayesian linear layers with ReLU between them; one weight sample per call, shared by the batch."""

    def __init__(self, sizes: list[int], prior_std: float, generator: torch.Generator):
        super().__init__()
        self.layers = nn.ModuleList(BayesianLinear(n_in, n_out, prior_std, generator)
                                    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else F.relu(x), generator)
        return x

    def kl(self) -> torch.Tensor:
        return sum(layer.kl() for layer in self.layers)


class BNNHead(Head):
    """Mean-field variational Bayesian head (one layer, or one hidden ReLU layer) on standardised features."""

    name = "bnn"

    def __init__(self, hidden: int = 0, prior_std: float = 1.0, mc_samples: int = 32, epochs: int = 200,
                 lr: float = 0.01, seed: int = 0):
        self.hidden = hidden
        self.prior_std = prior_std
        self.mc_samples = mc_samples
        self.epochs = epochs
        self.lr = lr
        self.seed = seed

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"hidden": trial.suggest_categorical("hidden", [0, 64, 256]),
                "prior_std": trial.suggest_float("prior_std", 0.03, 3.0, log=True),
                "lr": trial.suggest_float("lr", 1e-3, 3e-2, log=True)}

    def fit(self, X, y, X_val=None, y_val=None) -> BNNHead:
        check_positive(prior_std=self.prior_std, mc_samples=self.mc_samples, epochs=self.epochs, lr=self.lr)
        if self.hidden < 0:
            raise XferkitError(f"hidden must be 0 (one layer) or a number of units, got {self.hidden}.")
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
        self.classes_ = np.unique(y)
        self.device_ = resolve_device("auto")
        self.mean_, self.scale_ = torch.from_numpy(X.mean(0)), torch.from_numpy(X.std(0)).clamp_min(1e-6)
        generator = torch.Generator(self.device_).manual_seed(self.seed)
        self.net_ = self._build(X.shape[1], generator)
        val = None
        if X_val is not None and len(X_val):
            val = (X_val, torch.from_numpy(np.searchsorted(self.classes_, y_val)))
        targets = torch.from_numpy(np.searchsorted(self.classes_, y)).to(self.device_)
        self._train(self._inputs(X), targets, val, generator)
        return self

    def _build(self, n_features: int, generator: torch.Generator) -> BayesianMLP:
        sizes = [n_features, *([self.hidden] if self.hidden else []), len(self.classes_)]
        return BayesianMLP(sizes, self.prior_std, generator)

    def _inputs(self, X) -> torch.Tensor:
        X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        return ((X - self.mean_) / self.scale_).to(self.device_)

    def _train(self, X: torch.Tensor, y: torch.Tensor, val, generator: torch.Generator) -> None:
        """Adam, cosine-decayed, on the negative ELBO = N/B * (minibatch NLL) + KL(q || prior)."""
        n = len(X)
        optimizer = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs)
        with progress_bar("bnn", self.epochs, unit="epoch") as advance:
            for _ in range(self.epochs):
                neg_elbo = 0.0
                for idx in torch.randperm(n, generator=generator, device=X.device).split(BATCH_SIZE):
                    log_likelihood = -F.cross_entropy(self.net_(X[idx], generator), y[idx], reduction="sum")
                    elbo = n / len(idx) * log_likelihood - self.net_.kl()
                    optimizer.zero_grad()
                    (-elbo / n).backward()
                    optimizer.step()
                    neg_elbo += -elbo.item() * len(idx) / n
                schedule.step()
                advance(info=f"-elbo/n {neg_elbo / n:.3f}{self._validation_info(val)}")

    def _validation_info(self, val) -> str:
        if val is None:
            return ""
        proba = torch.from_numpy(self.predict_proba(val[0]))
        nll = F.nll_loss(proba.clamp_min(1e-12).log(), val[1]).item()
        return f" val_nll {nll:.3f} val_acc {(proba.argmax(1) == val[1]).float().mean().item():.3f}"

    def _sample_proba(self, X) -> torch.Tensor:
        """Softmax outputs under ``mc_samples`` weight draws, ``(S, n, n_classes)``; the same draws always."""
        check_is_fitted(self, "net_")
        chunks = []
        with torch.no_grad():
            for Xb in self._inputs(X).split(BATCH_SIZE * 8):
                generator = torch.Generator(self.device_).manual_seed(self.seed)
                logits = torch.stack([self.net_(Xb, generator) for _ in range(self.mc_samples)])
                chunks.append(logits.softmax(-1).cpu())
        return torch.cat(chunks, 1) if chunks else torch.zeros(self.mc_samples, 0, len(self.classes_))

    def predict_proba(self, X) -> np.ndarray:
        """The posterior predictive: softmax averaged over weight samples."""
        return self._sample_proba(X).mean(0).numpy()

    def uncertainty(self, X) -> dict[str, np.ndarray]:
        """Predictive entropy, and its epistemic part: the mutual information between label and weights."""
        samples = self._sample_proba(X).numpy()
        entropy = predictive_entropy(samples.mean(0))
        expected = np.mean([predictive_entropy(p) for p in samples], axis=0)
        return {"entropy": entropy, "mutual_information": entropy - expected}

    def _get_state(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v for k, v in self.net_.state_dict().items()}
        return {**state, "mean": self.mean_, "scale": self.scale_}

    def _set_state(self, state: dict[str, torch.Tensor], info: dict) -> None:
        self.device_ = resolve_device("auto")
        self.mean_, self.scale_ = state.pop("mean"), state.pop("scale")
        self.net_ = self._build(len(self.mean_), torch.Generator(self.device_))
        self.net_.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
