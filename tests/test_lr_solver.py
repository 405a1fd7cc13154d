"""The LR head's torch solver reaches scikit-learn's optimum, for every C of a batch at once."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from xferkit.core.errors import InvalidParameter
from xferkit.heads import FeatureHead, LogisticHead
from xferkit.heads._lbfgs import lbfgs_multinomial


def correlated_features(n=600, dim=40, n_classes=3, seed=0):
    """Overlapping classes seen through correlated channels (an ill-conditioned problem)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    latent = (rng.normal(0, 0.6, (n_classes, 8))[y] + rng.normal(0, 1, (n, 8))) * [4, 2, 1, 1, .5, .5, .2, .1]
    X = latent @ rng.normal(0, 1, (8, dim)) + rng.normal(0, 0.05, (n, dim))
    return StandardScaler().fit_transform(X).astype(np.float32), y


def objective(X, y, coef, intercept, C):
    Z = X.astype(np.float64) @ coef.T + intercept
    Z -= Z.max(axis=1, keepdims=True)
    nll = np.log(np.exp(Z).sum(axis=1)) - Z[np.arange(len(y)), y]
    return nll.mean() + (coef.astype(np.float64) ** 2).sum() / (2 * C * len(y))


def symmetric(model: LogisticRegression):
    """scikit-learn's binary model as the equivalent two-row softmax model."""
    if model.coef_.shape[0] > 1:
        return model.coef_, model.intercept_
    return np.vstack([-model.coef_, model.coef_]) / 2, np.r_[-model.intercept_, model.intercept_] / 2


@pytest.mark.parametrize("n_classes", [3, 2])
def test_every_C_of_a_batch_reaches_scikit_learns_optimum(n_classes):
    X, y = correlated_features(n_classes=n_classes)
    Cs = [0.01, 1.0, 100.0]
    # Two classes: scikit-learn's binary model with C is the softmax one with C / 2.
    W, n_iter = lbfgs_multinomial(torch.from_numpy(X), torch.from_numpy(y), n_classes,
                                  [C / 2 if n_classes == 2 else C for C in Cs])
    assert W.shape == (3, X.shape[1] + 1, n_classes) and n_iter < 1000
    for C, w in zip(Cs, W.numpy(), strict=True):
        reference = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(X, y)
        coef, intercept = symmetric(reference)
        C_soft = C / 2 if n_classes == 2 else C
        gap = objective(X, y, w[:-1].T, w[-1], C_soft) - objective(X, y, coef, intercept, C_soft)
        assert gap < 1e-5
        agree = np.mean((X @ w[:-1] + w[-1]).argmax(1) == reference.predict(X))
        assert agree > 0.99


def test_scikit_learns_default_tolerance_stops_short_and_the_head_does_not():
    X, y = correlated_features(n=2000, dim=60, seed=1)  # already standardised
    f_best = objective(X, y, *symmetric(LogisticRegression(C=10.0, tol=1e-10, max_iter=10000).fit(X, y)),
                       10.0)
    loose = LogisticRegression(C=10.0, max_iter=1000).fit(X, y)  # what the head used to run
    head = LogisticHead(C=10.0, solver="torch").fit(X, y)
    assert objective(X, y, *symmetric(loose), 10.0) - f_best > 1e-5
    assert objective((X - head.mean_) / head.scale_, y, head.coef_, head.intercept_, 10.0) - f_best < 1e-5


@pytest.mark.parametrize("n_classes", [3, 2])
def test_both_solvers_give_the_same_head(n_classes):
    X, y = correlated_features(n=900, n_classes=n_classes, seed=2)
    heads = {s: LogisticHead(solver=s, random_state=0).fit(X[:600], y[:600]) for s in ("torch", "sklearn")}
    assert heads["torch"].C_ == heads["sklearn"].C_
    assert heads["torch"].solver_ == "torch" and heads["sklearn"].solver_ == "sklearn"
    assert heads["torch"].coef_.shape == heads["sklearn"].coef_.shape == (1 if n_classes == 2 else 3, 40)
    agree = np.mean(heads["torch"].predict(X[600:]) == heads["sklearn"].predict(X[600:]))
    assert agree > 0.99
    np.testing.assert_allclose(heads["torch"].predict_proba(X[600:]), heads["sklearn"].predict_proba(X[600:]),
                               atol=0.02)


def test_auto_picks_torch_for_large_problems_and_round_trips(tmp_path, monkeypatch):
    import xferkit.heads.lr as lr_module

    X, y = correlated_features(n=3000, dim=64, n_classes=4)
    monkeypatch.setattr(lr_module, "TORCH_MIN_WORK", X.size * 4 + 1)
    assert LogisticHead(C=1.0).fit(X, y).solver_ == "sklearn"
    monkeypatch.setattr(lr_module, "TORCH_MIN_WORK", X.size * 4)
    head = LogisticHead(C=1.0).fit(X, y)
    assert head.solver_ == "torch"
    head.save(tmp_path / "h")
    np.testing.assert_array_equal(FeatureHead.load(tmp_path / "h").predict_proba(X), head.predict_proba(X))


def test_unknown_solver_is_a_clear_error():
    X, y = correlated_features(n=60)
    with pytest.raises(InvalidParameter, match="'solver' parameter of LogisticHead must be a str among"):
        LogisticHead(solver="newton").fit(X, y)


def test_solver_stops_cleanly_when_no_step_decreases_any_loss(monkeypatch):
    """A line search that fails for every problem at once ends the solve (it used to crash)."""
    import xferkit.heads._lbfgs as lbfgs_module

    real = lbfgs_module._armijo

    def failing(problems, W, f, direction, slope, lam, tries=30):
        ok, W_ok, P_ok, f_ok = real(problems, W, f, direction, slope, lam, tries)
        none = torch.zeros_like(ok)
        return none, W_ok[:0], P_ok[:, :0], f_ok[:0]

    monkeypatch.setattr(lbfgs_module, "_armijo", failing)
    X, y = correlated_features(n=60)
    head = LogisticHead(solver="torch", C=1.0).fit(X, y)
    assert head.n_iter_ == 1 and np.isfinite(head.predict_proba(X)).all()
