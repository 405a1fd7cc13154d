"""The Gaussian-process head: exact and sparse variants learn, integrate over the latent GP, calibrate,
stop when converged, round-trip."""

import numpy as np
import pytest
import torch
from conftest import separable_features

from xferkit.core.errors import InvalidParameter
from xferkit.core.metrics import classification_metrics
from xferkit.heads import GPHead
from xferkit.heads.gp import WINDOW


def split(n_per_class: int = 30):
    """Three separable classes: the first 60 examples to train on, the rest held out."""
    X, y = separable_features(n_per_class=n_per_class)
    return X[:60], y[:60], X[60:], y[60:]


def far_from_the_data(n: int) -> np.ndarray:
    """Random directions at 10x the spread of the class centres: far from all of them."""
    return np.random.default_rng(1).normal(0, 40, (n, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def exact():
    X, y, X_test, y_test = split()
    return GPHead(epochs=30, random_state=0).fit(X, y), X_test, y_test


@pytest.mark.parametrize("method", ["exact", "svgp"])
def test_learns_separable_data_with_valid_probabilities(method):
    X, y, X_test, y_test = split()
    head = GPHead(method, inducing=16, epochs=30, random_state=0).fit(X, y)
    proba = head.predict_proba(X_test)
    assert head.method_ == method and head.score(X_test, y_test) >= 0.95
    assert proba.shape == (len(X_test), 3) and np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def overlapping_split():
    """Three classes whose blobs overlap a little: some mistakes, so calibration can be measured."""
    X, y = separable_features(n_per_class=60, spread=4.0)
    return X[:90], y[:90], X[90:], y[90:]


def test_fitted_temperature_sharpens_the_underconfident_gp_without_changing_its_classes():
    X, y, X_test, y_test = overlapping_split()
    raw = GPHead(temperature=1.0, random_state=0).fit(X, y)
    tuned = GPHead(random_state=0).fit(X, y)  # exact: from leave-one-out predictions, no validation data
    assert raw.temperature_ == 1.0 and tuned.temperature_ < 0.8
    np.testing.assert_array_equal(tuned.predict(X_test), raw.predict(X_test))
    nll = {name: classification_metrics(y_test, head.predict_proba(X_test))["nll"]
           for name, head in (("raw", raw), ("tuned", tuned))}
    assert nll["tuned"] < 0.8 * nll["raw"]


def test_perfectly_separated_data_do_not_drive_the_temperature_to_certainty(exact):
    head, _, _ = exact  # every leave-one-out prediction is right: the NLL alone would pick T -> 0
    assert 0.3 < head.temperature_ < 1.0


def test_leave_one_out_equals_the_gp_conditioned_on_the_other_examples(exact):
    head, _, _ = exact
    Z = head.model_.train_inputs[0]
    mean, var = head._leave_one_out()
    for i in (0, 17, 42):
        others = torch.arange(len(Z)) != i
        model = head._build(Z.shape[1], train=(Z[others], head.targets_[others])).double()
        model.load_state_dict(head.model_.state_dict())
        model.eval()
        with torch.no_grad():
            dist = model(Z[i:i + 1])
        torch.testing.assert_close(mean[i], dist.mean[:, 0], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(var[i], dist.variance[:, 0], atol=1e-3, rtol=1e-3)


def test_svgp_keeps_temperature_one_unless_given():
    X, y, X_test, y_test = overlapping_split()
    params = {"method": "svgp", "inducing": 16, "epochs": 40, "random_state": 0}
    raw = GPHead(**params).fit(X, y)  # a shared validation-set temperature is applied downstream
    sharper = GPHead(temperature=0.5, **params).fit(X, y)
    assert raw.temperature_ == 1.0 and sharper.temperature_ == 0.5
    np.testing.assert_array_equal(sharper.predict(X_test), raw.predict(X_test))
    assert sharper.predict_proba(X_test).max(1).mean() > raw.predict_proba(X_test).max(1).mean()


def test_training_stops_once_converged():
    X, y, X_test, y_test = split()
    exact = GPHead(epochs=100, random_state=0).fit(X, y)
    svgp = GPHead("svgp", inducing=16, epochs=1000, random_state=0).fit(X, y)
    assert exact.epochs_ < 100 and 2 * WINDOW <= svgp.epochs_ < 1000
    assert exact.score(X_test, y_test) >= 0.95 and svgp.score(X_test, y_test) >= 0.95


def test_auto_picks_exact_for_small_data(exact):
    head, _, _ = exact
    assert head.method == "auto" and head.method_ == "exact"


def test_projection_to_fewer_dimensions_still_learns():
    X, y, X_test, y_test = split()
    head = GPHead(dim=4, epochs=30, random_state=0).fit(X, y)
    assert head.projection_.shape == (16, 4) and head.score(X_test, y_test) >= 0.95


@pytest.mark.parametrize("method", ["exact", "svgp"])
def test_save_load_gives_identical_predictions(method, tmp_path):
    X, y, X_test, _ = split()
    head = GPHead(method, inducing=16, dim=8, epochs=5, random_state=0).fit(X, y)
    head.save(tmp_path / "head")
    loaded = GPHead.load(tmp_path / "head")
    assert type(loaded) is type(head) and loaded.method_ == method
    np.testing.assert_array_equal(loaded.predict_proba(X_test), head.predict_proba(X_test))
    np.testing.assert_array_equal(loaded.uncertainty(X_test)["variance"],
                                  head.uncertainty(X_test)["variance"])


def test_uncertainty_grows_away_from_the_training_data(exact):
    head, X_test, _ = exact
    near, far = head.uncertainty(X_test), head.uncertainty(far_from_the_data(len(X_test)))
    assert far["variance"].mean() > 2 * near["variance"].mean()
    assert far["entropy"].mean() > near["entropy"].mean() + 0.3


@pytest.mark.parametrize(("params", "message"), [
    ({"lr": -0.1}, "'lr' parameter of GPHead must be a float in the range"),
    ({"method": "laplace"}, "'method' parameter of GPHead must be a str among"),
    ({"method": "svgp", "inducing": 61}, "inducing=61 exceeds the 60 training examples"),
    ({"dim": 100}, "dim=100 is too large"),
    ({"alpha_epsilon": 0}, "'alpha_epsilon' parameter of GPHead must be a float in the range"),
    ({"temperature": -1.0}, "'temperature' parameter of GPHead must be a float in the range"),
])
def test_bad_hyper_parameters_are_clear_errors(params, message):
    X, y, _, _ = split()
    with pytest.raises(InvalidParameter, match=message):
        GPHead(**params).fit(X, y)


def test_predictions_are_deterministic_and_do_not_depend_on_the_other_rows(exact):
    head, X_test, _ = exact
    whole = head.predict_proba(X_test)
    np.testing.assert_allclose(np.vstack([head.predict_proba(X_test[i:i + 1]) for i in range(5)]), whole[:5],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(head.predict_proba(X_test), whole)
