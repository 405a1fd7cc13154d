"""The Gaussian-process head: exact and sparse variants learn, integrate over the latent GP, round-trip."""

import json

import numpy as np
import pytest
from conftest import TINY_BACKBONE, separable_features
from typer.testing import CliRunner

from xferkit.cli import app
from xferkit.errors import XferkitError
from xferkit.heads import Head, create_head


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
    return create_head("gp", epochs=30).fit(X, y, X_test, y_test), X_test, y_test


@pytest.mark.parametrize("method", ["exact", "svgp"])
def test_learns_separable_data_with_valid_probabilities(method):
    X, y, X_test, y_test = split()
    head = create_head("gp", method=method, inducing=16, epochs=30).fit(X, y)
    proba = head.predict_proba(X_test)
    assert head.method_ == method and head.score(X_test, y_test) >= 0.95
    assert proba.shape == (len(X_test), 3) and np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_auto_picks_exact_for_small_data(exact):
    head, _, _ = exact
    assert head.method == "auto" and head.method_ == "exact"


def test_projection_to_fewer_dimensions_still_learns():
    X, y, X_test, y_test = split()
    head = create_head("gp", dim=4, epochs=30).fit(X, y)
    assert head.projection_.shape == (16, 4) and head.score(X_test, y_test) >= 0.95


@pytest.mark.parametrize("method", ["exact", "svgp"])
def test_save_load_gives_identical_predictions(method, tmp_path):
    X, y, X_test, _ = split()
    head = create_head("gp", method=method, inducing=16, dim=8, epochs=5).fit(X, y)
    head.save(tmp_path / "head")
    loaded = Head.load(tmp_path / "head")
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
    ({"lr": -0.1}, "lr must be positive"),
    ({"method": "laplace"}, "unknown GP method 'laplace'"),
    ({"method": "svgp", "inducing": 61}, "inducing=61 exceeds the 60 training examples"),
    ({"dim": 100}, "dim=100 is too large"),
])
def test_bad_hyper_parameters_are_clear_errors(params, message):
    X, y, _, _ = split()
    with pytest.raises(XferkitError, match=message):
        create_head("gp", **params).fit(X, y)


def test_cli_repurpose_and_evaluate(image_folder, tmp_path):
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return json.loads(result.stdout)

    summary = run("repurpose", image_folder, "--backbone", TINY_BACKBONE, "--no-pretrained",
                  "--image-size", "32", "--head", "gp", "--gp-method", "exact", "--epochs", "10",
                  "-o", tmp_path / "gp", "--json")
    assert summary["head"] == "gp" and summary["head_params"]["method"] == "exact"
    report = run("evaluate", tmp_path / "gp", image_folder, "--json")
    assert report["metrics"]["n"] == 30 and 0.0 <= report["metrics"]["accuracy"] <= 1.0
