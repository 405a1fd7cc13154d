"""The logistic-regression head: learns, gives valid probabilities, round-trips through safetensors."""

import numpy as np
import pytest
from conftest import separable_features

from xferkit.errors import XferkitError
from xferkit.heads import Head, create_head
from xferkit.heads.lr import C_GRID


def test_learns_separable_data_with_valid_probabilities():
    X, y = separable_features(n_per_class=50, n_classes=4)
    head = create_head("lr").fit(X[:150], y[:150], X[150:], y[150:])
    proba = head.predict_proba(X[150:])
    assert head.score(X[150:], y[150:]) >= 0.98
    assert proba.shape == (50, 4) and np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_C_is_chosen_on_validation_unless_given():
    X, y = separable_features(n_per_class=30, spread=3.0)
    chosen = create_head("lr").fit(X[:60], y[:60], X[60:], y[60:])
    fixed = create_head("lr", C=0.5).fit(X[:60], y[:60], X[60:], y[60:])
    assert chosen.C_ in C_GRID and fixed.C_ == 0.5


def test_two_classes_work():
    X, y = separable_features(n_classes=2)
    head = create_head("lr").fit(X, y)
    assert head.predict_proba(X).shape == (len(y), 2) and head.score(X, y) >= 0.98


def test_save_load_gives_identical_predictions(tmp_path):
    X, y = separable_features()
    head = create_head("lr").fit(X, y)
    head.save(tmp_path / "head")
    loaded = Head.load(tmp_path / "head")
    assert type(loaded) is type(head) and loaded.C_ == head.C_
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert not list((tmp_path / "head").glob("*.pkl"))


def test_bad_hyper_parameters_are_clear():
    X, y = separable_features()
    with pytest.raises(XferkitError, match="C must be positive"):
        create_head("lr", C=-1.0).fit(X, y)
    with pytest.raises(XferkitError, match="the lr head does not take --unfreeze"):
        create_head("lr", unfreeze="2")
    with pytest.raises(XferkitError, match="unknown head"):
        create_head("svm")
