"""The Bayesian NN head: variational inference learns, averages over weights, knows what it has not seen."""

import numpy as np
import pytest
import torch
from conftest import separable_features
from torch.distributions import Normal, kl_divergence

from xferkit.core.errors import InvalidParameter
from xferkit.heads import BNNHead, FeatureHead
from xferkit.heads.bnn import gaussian_kl


def split(n_per_class: int = 30):
    """Three separable classes: the first 60 examples to train on, the rest held out."""
    X, y = separable_features(n_per_class=n_per_class)
    return X[:60], y[:60], X[60:], y[60:]


def far_from_the_data(n: int) -> np.ndarray:
    """Random directions at 10x the spread of the class centres: far from all of them."""
    return np.random.default_rng(1).normal(0, 40, (n, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def linear():
    X, y, X_test, y_test = split()
    return BNNHead(epochs=100, lr=0.05, random_state=0).fit(X, y), X_test, y_test


def test_closed_form_kl_matches_torch():
    mu, sigma = torch.tensor([0.0, 1.5, -2.0]), torch.tensor([0.1, 1.0, 3.0])
    expected = kl_divergence(Normal(mu, sigma), Normal(0.0, 0.5)).sum()
    torch.testing.assert_close(gaussian_kl(mu, sigma, 0.5), expected)


@pytest.mark.parametrize("hidden", [0, 16])
def test_learns_separable_data_with_valid_probabilities(hidden, linear):
    X, y, X_test, y_test = split()
    head = linear[0] if hidden == 0 else BNNHead(hidden, epochs=100, lr=0.05, random_state=0).fit(X, y)
    proba = head.predict_proba(X_test)
    assert len(head.net_.layers) == (2 if hidden else 1) and head.score(X_test, y_test) >= 0.95
    assert proba.shape == (len(X_test), 3) and np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_posterior_is_a_distribution_not_a_point(linear):
    head, X_test, _ = linear
    sigma = torch.nn.functional.softplus(head.net_.layers[0].weight_rho)
    assert sigma.mean() > 0.01  # grown from the 1e-3 start by the KL term
    draws = head._sample_proba(X_test[:5])
    assert draws.shape == (head.mc_samples, 5, 3) and draws.std(0).max() > 1e-4


def test_save_load_gives_identical_predictions(linear, tmp_path):
    head, X_test, _ = linear
    head.save(tmp_path / "head")
    loaded = FeatureHead.load(tmp_path / "head")
    assert type(loaded) is type(head)
    np.testing.assert_array_equal(loaded.predict_proba(X_test), head.predict_proba(X_test))
    np.testing.assert_array_equal(loaded.uncertainty(X_test)["mutual_information"],
                                  head.uncertainty(X_test)["mutual_information"])


def test_epistemic_uncertainty_grows_away_from_the_training_data(linear):
    head, X_test, _ = linear
    near, far = head.uncertainty(X_test), head.uncertainty(far_from_the_data(len(X_test)))
    assert np.all(near["mutual_information"] >= -1e-6)
    assert np.all(near["mutual_information"] <= near["entropy"] + 1e-6)
    assert far["mutual_information"].mean() > 10 * near["mutual_information"].mean() + 1e-3
    assert far["entropy"].mean() > near["entropy"].mean()


@pytest.mark.parametrize(("params", "message"), [
    ({"lr": -0.1}, "'lr' parameter of BNNHead must be a float in the range"),
    ({"prior_std": 0}, "'prior_std' parameter of BNNHead must be a float in the range"),
    ({"mc_samples": 0}, "'mc_samples' parameter of BNNHead must be an int in the range"),
    ({"hidden": -1}, "'hidden' parameter of BNNHead must be an int in the range"),
])
def test_bad_hyper_parameters_are_clear_errors(params, message):
    X, y, _, _ = split()
    with pytest.raises(InvalidParameter, match=message):
        BNNHead(**params).fit(X, y)


def test_predictions_are_deterministic_and_do_not_depend_on_the_other_rows(linear):
    head, X_test, _ = linear
    whole = head.predict_proba(X_test)
    np.testing.assert_allclose(np.vstack([head.predict_proba(X_test[i:i + 1]) for i in range(5)]), whole[:5],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(head.predict_proba(X_test), whole)
