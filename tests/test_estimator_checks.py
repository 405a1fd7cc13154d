"""Every feature head is a scikit-learn estimator: scikit-learn's checks, and the contract others rely on."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import separable_features
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from xferkit.core.errors import InvalidParameter, XferkitError
from xferkit.heads import FEATURE_HEADS, BNNHead, FeatureHead, GPHead, LaplaceHead, LogisticHead


def small_heads() -> list[FeatureHead]:
    """One head of each kind, with training budgets small enough for the checks to run in seconds.

    The BNN's 20 epochs take a larger step than its default lr: scikit-learn's two-feature data sets
    give it only a few minibatches an epoch. The Laplace head's prior is fixed: one MAP fit, not the
    evidence's grid of them (tests/test_head_laplace.py checks that choice).
    """
    return [LogisticHead(), GPHead(epochs=10), BNNHead(epochs=20, lr=0.1, mc_samples=8),
            LaplaceHead(prior_precision=1.0, mc_samples=8)]


@parametrize_with_checks(small_heads())
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(params=small_heads(), ids=lambda head: head.name)
def head(request) -> FeatureHead:
    """A fresh, unfitted head of each kind."""
    return clone(request.param)


def test_roc_auc_cross_validation_on_two_classes(head):
    X, y = separable_features(n_per_class=30, n_classes=2, spread=3.0)
    scores = cross_val_score(head.set_params(random_state=0), X, y, scoring="roc_auc", cv=3)
    assert scores.shape == (3,) and scores.min() > 0.9


def test_string_labels_survive_save_and_load(head, tmp_path):
    X, y = separable_features(n_per_class=20)
    labels = np.array(["cat", "dog", "fox"])[y]
    head.set_params(random_state=0).fit(X, labels)
    head.save(tmp_path / "head")
    loaded = FeatureHead.load(tmp_path / "head")
    assert type(loaded) is type(head) and loaded.classes_.dtype == head.classes_.dtype
    np.testing.assert_array_equal(loaded.classes_, ["cat", "dog", "fox"])
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert (head.predict(X) == labels).mean() > 0.95
    assert json.loads((tmp_path / "head" / "head.json").read_text())["classes"] == ["cat", "dog", "fox"]


@pytest.mark.parametrize("labels", [np.array([True, False]), np.array([3, 7]), np.array([0.0, 2.0]),
                                    np.array(["a", "b"], dtype=object)])
def test_labels_of_any_type_round_trip_exactly(labels, tmp_path):
    X, y = separable_features(n_per_class=10, n_classes=2)
    head = LogisticHead(C=1.0).fit(X, labels[y])
    head.save(tmp_path / "head")
    loaded = LogisticHead.load(tmp_path / "head")
    assert loaded.classes_.dtype == head.classes_.dtype
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    assert [type(label) for label in loaded.classes_] == [type(label) for label in head.classes_]


def test_hyper_parameters_json_cannot_hold_are_saved_as_null(tmp_path):
    X, y = separable_features(n_per_class=10)
    LogisticHead(random_state=np.random.RandomState(0)).fit(X, y).save(tmp_path / "head")
    params = json.loads((tmp_path / "head" / "head.json").read_text())["params"]
    assert params["random_state"] is None and params["C"] is None and params["validation_fraction"] == 0.2
    assert LogisticHead.load(tmp_path / "head").get_params()["random_state"] is None


def test_unfitted_head_raises_not_fitted(head, tmp_path):
    X, _ = separable_features(n_per_class=5)
    for method in (head.predict, head.predict_proba, head.uncertainty):
        with pytest.raises(NotFittedError):
            method(X)
    with pytest.raises(NotFittedError):
        head.save(tmp_path / "head")


def test_predicting_with_a_different_number_of_features_is_an_error(head):
    X, y = separable_features(n_per_class=10)
    head.fit(X, y)
    assert head.n_features_in_ == X.shape[1]
    with pytest.raises(ValueError, match="X has 15 features"):
        head.predict_proba(X[:, 1:])


def test_fitting_twice_with_the_same_random_state_gives_the_same_head(head):
    X, y = separable_features(n_per_class=15, spread=2.0)
    head.set_params(random_state=3)
    first = head.fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(head.fit(X, y).predict_proba(X), first)
    np.testing.assert_array_equal(head.uncertainty(X)["entropy"], head.uncertainty(X)["entropy"])


def test_progress_is_reported_as_training_advances(head):
    X, y = separable_features(n_per_class=15)
    calls = []
    head.fit(X, y, progress=lambda done, total, info: calls.append((done, total, info)))
    done = [call[0] for call in calls]
    assert calls and done == sorted(done) and done[-1] >= 1
    assert all(0 < d <= total and isinstance(info, str) for d, total, info in calls)


def test_uncertainty_has_entropy_in_nats_and_the_heads_own_measure(head):
    X, y = separable_features(n_per_class=10)
    result = head.fit(X, y).uncertainty(X)
    extra = {"lr": set(), "gp": {"variance"}, "bnn": {"mutual_information"},
             "laplace": {"variance", "mutual_information"}}[head.name]
    assert set(result) == {"entropy"} | extra
    assert all(value.shape == (len(X),) for value in result.values())
    assert np.all((result["entropy"] >= 0) & (result["entropy"] <= np.log(3) + 1e-9))


def test_bad_hyper_parameters_are_invalid_parameter_errors_naming_the_parameter(head):
    X, y = separable_features(n_per_class=5)
    name = {"lr": "max_iter", "gp": "epochs", "bnn": "epochs", "laplace": "max_iter"}[head.name]
    with pytest.raises(InvalidParameter, match=f"'{name}' parameter of {type(head).__name__}"):
        head.set_params(**{name: 0}).fit(X, y)
    assert issubclass(InvalidParameter, ValueError) and issubclass(InvalidParameter, XferkitError)


def test_every_hyper_parameter_is_constrained_and_documented_on_one_line(head):
    params = inspect.signature(type(head).__init__).parameters
    names = [name for name in params if name != "self"]
    assert set(type(head)._parameter_constraints) == set(names)
    lines = inspect.getdoc(type(head)).splitlines()
    section = lines[lines.index("Parameters") + 2:lines.index("Attributes") - 1]
    for i, name in enumerate(names):
        default = f"default={params[name].default!r}".replace("'", '"')
        assert params[name].annotation is not inspect.Parameter.empty
        assert section[2 * i].startswith(f"{name} : ") and section[2 * i].endswith(default)
        assert section[2 * i + 1].startswith("    ") and not section[2 * i + 1].startswith("     ")
    assert len(section) == 2 * len(names)


def test_registry_names_the_heads_and_load_dispatches_on_the_saved_name(tmp_path):
    X, y = separable_features(n_per_class=10)
    for name, target in FEATURE_HEADS.items():
        module, cls = target.split(":")
        assert getattr(__import__(module, fromlist=[cls]), cls).name == name
    LogisticHead(C=1.0).fit(X, y).save(tmp_path / "lr")
    assert type(FeatureHead.load(tmp_path / "lr")) is LogisticHead
    with pytest.raises(XferkitError, match="holds a 'lr' head, not a 'gp' one"):
        GPHead.load(tmp_path / "lr")


@pytest.mark.parametrize("damage", ["missing", "corrupt json", "corrupt tensors", "unknown head"])
def test_unreadable_folders_are_clear_errors_naming_the_folder(damage, tmp_path):
    X, y = separable_features(n_per_class=10)
    folder = tmp_path / "head"
    LogisticHead(C=1.0).fit(X, y).save(folder)
    meta = json.loads((folder / "head.json").read_text())
    if damage == "missing":
        (folder / "head.safetensors").unlink()
    elif damage == "corrupt json":
        (folder / "head.json").write_text("{not json")
    elif damage == "corrupt tensors":
        (folder / "head.safetensors").write_bytes(b"\x00" * 20)
    else:
        (folder / "head.json").write_text(json.dumps({**meta, "name": "svm"}))
    with pytest.raises(XferkitError, match=re.escape(str(folder))):
        FeatureHead.load(folder)


def test_importing_the_heads_package_imports_no_head_until_one_is_asked_for():
    code = """if True:
        import sys
        import xferkit.heads as heads
        print(sorted(name for name in sys.modules if name.startswith("xferkit.heads.")))
        heads.LogisticHead
        print("xferkit.heads.lr" in sys.modules, "xferkit.heads.gp" in sys.modules)"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "True", "False"]
    with pytest.raises(AttributeError, match="has no attribute 'SVMHead'"):
        __import__("xferkit.heads").heads.SVMHead  # noqa: B018
