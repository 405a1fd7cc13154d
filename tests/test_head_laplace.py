"""The last-layer Laplace head: its closed forms against brute force, the evidence's choice, uncertainty
that grows away from the data, and save/load."""

import json

import numpy as np
import pytest
import torch
from conftest import separable_features
from scipy.special import softmax

from xferkit.core.errors import XferkitError
from xferkit.heads import FeatureHead, LaplaceHead
from xferkit.heads.laplace import PROBIT


@pytest.fixture(scope="module")
def fitted() -> tuple[LaplaceHead, np.ndarray, np.ndarray]:
    """A head whose prior precision the evidence chose, on overlapping classes, and its data."""
    X, y = separable_features(n_per_class=30, dim=6, spread=3.0)
    return LaplaceHead(random_state=0, mc_samples=50).fit(X, y), X, y


def brute_force_posterior(head: LaplaceHead) -> np.ndarray:
    """The covariance ``(A (x) B + delta I)^-1`` built as one matrix from the saved factors."""
    U, a, V, b = head.a_eigenvectors_, head.a_eigenvalues_, head.b_eigenvectors_, head.b_eigenvalues_
    precision = np.kron(U * a @ U.T, V * b @ V.T) + head.prior_precision_ * np.eye(len(a) * len(b))
    return np.linalg.inv(precision)


def test_learns_with_valid_probabilities_and_the_probit_of_the_exact_logit_covariance(fitted):
    head, X, y = fitted
    proba = head.predict_proba(X)
    assert head.score(X, y) >= 0.9 and np.allclose(proba.sum(axis=1), 1.0)
    # vec(W) row-major: the logits' Jacobian is phi^T (x) I, their covariance J Sigma J^T
    Phi = np.hstack([head._standardised(X), np.ones((len(X), 1))])
    k = len(head.classes_)
    jacobians = np.einsum("ni,ab->naib", Phi, np.eye(k)).reshape(len(X), k, -1)
    covariance = jacobians @ brute_force_posterior(head) @ jacobians.transpose(0, 2, 1)
    centre = np.eye(k) - 1 / k
    variances = np.diagonal(centre @ covariance @ centre, axis1=1, axis2=2)
    expected = softmax(Phi @ head.weights_ / np.sqrt(1 + PROBIT * variances), axis=1)
    np.testing.assert_allclose(proba, expected, rtol=1e-6)
    np.testing.assert_allclose(head.uncertainty(X)["variance"], variances.mean(axis=1), rtol=1e-6)


def test_the_evidence_chooses_the_prior_precision(fitted):
    head, X, y = fitted
    at = {delta: LaplaceHead(delta).fit(X, y).log_marginal_likelihood_
          for delta in (head.prior_precision_ / 10, head.prior_precision_, head.prior_precision_ * 10)}
    assert at[head.prior_precision_] == pytest.approx(head.log_marginal_likelihood_, rel=1e-4)
    assert max(at, key=at.get) == head.prior_precision_
    # the evidence's log determinant is the one of the whole posterior precision
    sign, log_det = np.linalg.slogdet(np.linalg.inv(brute_force_posterior(head)))
    a, b = head.a_eigenvalues_, head.b_eigenvalues_
    assert sign == 1 and log_det == pytest.approx(np.log(np.outer(a, b) + head.prior_precision_).sum())


def test_predictive_variance_grows_away_from_the_data_and_confidence_falls(fitted):
    head, X, _ = fitted
    direction = np.random.default_rng(1).normal(size=(20, X.shape[1]))
    far = [X.mean(0) + scale * X.std() * direction for scale in (1, 10, 100)]
    variance = [head.uncertainty(points)["variance"] for points in far]
    assert np.all(variance[0] < variance[1]) and np.all(variance[1] < variance[2])
    assert variance[1].min() > head.uncertainty(X)["variance"].max()
    information = [head.uncertainty(points)["mutual_information"].mean() for points in far]
    assert information[0] < information[2]
    mean_logits = np.hstack([head._standardised(far[2]), np.ones((20, 1))]) @ head.weights_
    assert np.all(head.predict_proba(far[2]).max(1) < softmax(mean_logits, axis=1).max(1))


@pytest.mark.parametrize("link", ["probit", "mc"])
def test_save_load_gives_identical_predictions(link, fitted, tmp_path):
    _, X, y = fitted
    head = LaplaceHead(1.0, link=link, mc_samples=20, random_state=0).fit(X, y)
    head.save(tmp_path / "head")
    loaded = FeatureHead.load(tmp_path / "head")
    assert type(loaded) is LaplaceHead and loaded.prior_precision_ == head.prior_precision_
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    for key, value in head.uncertainty(X).items():
        np.testing.assert_array_equal(loaded.uncertainty(X)[key], value)


def test_mc_link_approaches_its_samples_average_and_agrees_with_probit(fitted):
    head, X, _ = fitted
    mc = LaplaceHead(link="mc", mc_samples=2000, random_state=0).fit(*fitted[1:])
    assert mc.prior_precision_ == head.prior_precision_
    assert np.abs(mc.predict_proba(X) - head.predict_proba(X)).mean() < 0.02


def test_the_torch_module_computes_the_probit_predictive(fitted):
    head, X, _ = fitted
    module = head.torch_modules()["probit"]
    with torch.no_grad():
        got = module(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(got, head.predict_proba(X), atol=1e-4)


def test_negative_saved_eigenvalues_are_a_damaged_folder(fitted, tmp_path):
    from safetensors.numpy import load_file, save_file

    head, _, _ = fitted
    head.save(tmp_path / "head")
    arrays = load_file(tmp_path / "head" / "head.safetensors")
    arrays["b_eigenvalues"][0] = -1.0
    save_file(arrays, tmp_path / "head" / "head.safetensors")
    with pytest.raises(XferkitError, match="head.safetensors.*must not be negative"):
        FeatureHead.load(tmp_path / "head")
    assert json.loads((tmp_path / "head" / "head.json").read_text())["name"] == "laplace"
