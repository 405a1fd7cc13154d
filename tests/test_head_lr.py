"""The logistic-regression head: learns, gives valid probabilities, chooses C on its own held-out part,
round-trips through safetensors."""

import numpy as np
import pytest
from conftest import separable_features

from xferkit.core.errors import InvalidParameter
from xferkit.heads import FeatureHead, LogisticHead
from xferkit.heads.base import stratified_holdout
from xferkit.heads.lr import C_GRID, FALLBACK_C


def test_learns_separable_data_with_valid_probabilities():
    X, y = separable_features(n_per_class=50, n_classes=4)
    head = LogisticHead(random_state=0).fit(X[:150], y[:150])
    proba = head.predict_proba(X[150:])
    assert head.score(X[150:], y[150:]) >= 0.98
    assert proba.shape == (50, 4) and np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert head.coef_.shape == (4, 16) and head.intercept_.shape == (4,)


def test_C_is_chosen_on_a_held_out_part_unless_given():
    X, y = separable_features(n_per_class=30, spread=3.0)
    chosen = LogisticHead(random_state=0).fit(X, y)
    fixed = LogisticHead(C=0.5).fit(X, y)
    assert chosen.C_ in C_GRID and fixed.C_ == 0.5


def test_the_chosen_C_is_refitted_on_all_of_X():
    X, y = separable_features(n_per_class=30, spread=3.0)
    chosen = LogisticHead(random_state=0).fit(X, y)
    refit = LogisticHead(C=chosen.C_).fit(X, y)
    np.testing.assert_allclose(chosen.coef_, refit.coef_)
    np.testing.assert_allclose(chosen.intercept_, refit.intercept_)


def test_held_out_part_is_stratified_and_keeps_small_classes_for_training():
    y = np.array([0] * 50 + [1] * 10 + [2] * 2 + [3])
    kept, held_out = stratified_holdout(y, 0.2, random_state=0)
    assert np.bincount(y[held_out], minlength=4).tolist() == [10, 2, 0, 0]
    assert sorted([*kept, *held_out]) == list(range(len(y)))
    assert np.array_equal(held_out, stratified_holdout(y, 0.2, random_state=0)[1])
    assert not np.array_equal(held_out, stratified_holdout(y, 0.2, random_state=1)[1])


def test_too_few_examples_to_hold_out_fall_back_to_the_default_C():
    X, y = separable_features(n_per_class=2)
    assert LogisticHead().fit(X, y).C_ == FALLBACK_C


def test_two_classes_follow_scikit_learns_binary_shapes():
    X, y = separable_features(n_classes=2)
    head = LogisticHead(random_state=0).fit(X, y)
    assert head.coef_.shape == (1, 16) and head.intercept_.shape == (1,)
    assert head.decision_function(X).shape == (len(y),)
    assert head.predict_proba(X).shape == (len(y), 2) and head.score(X, y) >= 0.98
    np.testing.assert_array_equal(head.predict(X), head.classes_[(head.decision_function(X) > 0).astype(int)])


def test_save_load_gives_identical_predictions(tmp_path):
    X, y = separable_features()
    head = LogisticHead(random_state=0).fit(X, y)
    head.save(tmp_path / "head")
    loaded = FeatureHead.load(tmp_path / "head")
    assert type(loaded) is LogisticHead and loaded.C_ == head.C_ and loaded.solver_ == head.solver_
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["head.json", "head.safetensors"]


def test_bad_hyper_parameters_are_clear():
    X, y = separable_features()
    with pytest.raises(InvalidParameter, match="'C' parameter of LogisticHead must be a float"):
        LogisticHead(C=-1.0).fit(X, y)
    with pytest.raises(InvalidParameter, match="'validation_fraction' parameter"):
        LogisticHead(validation_fraction=1.0).fit(X, y)
    with pytest.raises(InvalidParameter, match="C=None chooses C on a held-out part"):
        LogisticHead(validation_fraction=0).fit(X, y)
    assert LogisticHead(C=1.0, validation_fraction=0).fit(X, y).C_ == 1.0
