"""What every feature head shares: a scikit-learn classifier on ``(n, d)`` features, saved without pickle.

A head validates its hyper-parameters and data in :meth:`FeatureHead.fit`, standardises the features,
and learns in ``_fit`` from class indices (``classes_`` maps them back to labels of any type).
Predictions are computed in float64, so that rounding cannot make one row's prediction depend on
the other rows of X (scikit-learn's checks compare predictions row by row and in a batch).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from numbers import Integral
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as safetensors_bytes
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, InvalidParameterError, validate_parameter_constraints
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from xferkit.core.errors import InvalidParameter, XferkitError
from xferkit.core.metrics import predictive_entropy
from xferkit.core.saved import (
    blame,
    checked,
    checked_classes,
    expect_keys,
    plain,
    read_json_object,
    read_safetensors,
    require,
)
from xferkit.heads import FEATURE_HEADS

#: ``progress(done, total, info)``: told how far ``fit`` has got (``info`` such as ``"loss 0.123"``).
ProgressCallback = Callable[[int, int, str], None]
#: A feature whose standard deviation is below this fraction of its mean's size is constant: it is
#: centred, not scaled up (relative, as scikit-learn's StandardScaler: features of a random backbone
#: can all be ~1e-9 and still separate the classes).
CONSTANT_STD = 1e-6
#: What ``save`` writes into a folder, and the keys of its JSON.
META, ARRAYS = "head.json", "head.safetensors"
META_KEYS = ("name", "params", "fitted", "classes", "classes_dtype", "n_features_in")
#: The seeds :func:`draw_seed` draws, as a fitted scalar's constraint.
SEED = [Interval(Integral, 0, np.iinfo(np.int32).max, closed="left")]


@dataclass(frozen=True)
class ArraySpec:
    """The shape (``None``: any length) and dtype of a saved array, and whether its floats must be finite."""

    shape: tuple[int | None, ...]
    dtype: type | np.dtype = np.float64
    finite: bool = True


def column_moments(X: np.ndarray, chunk_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation in float64, a chunk of rows at a time (two passes): no
    float64 copy of the whole matrix, which at 10^6 x 512 features would be 4 GB."""
    chunks = [X[i:i + chunk_rows] for i in range(0, len(X), chunk_rows)]
    mean = sum(c.sum(axis=0, dtype=np.float64) for c in chunks) / len(X)
    variance = sum(np.square(c - mean).sum(axis=0) for c in chunks) / len(X)
    return mean, np.sqrt(variance)


class FeatureHead(ClassifierMixin, BaseEstimator):
    """A classifier on backbone features: ``fit(X, y)``, ``predict_proba(X)``, ``save``/``load``.

    Subclasses declare their hyper-parameters as keywords of ``__init__`` with
    ``_parameter_constraints``, learn in ``_fit``, and list what ``save`` keeps: the JSON scalars
    with their constraints in ``_fitted_scalars``, the arrays through ``_fitted_arrays`` /
    ``_restore_arrays``, and what ``load`` accepts of them in ``_array_specs``.
    """

    name: ClassVar[str]
    _parameter_constraints: ClassVar[dict[str, list]] = {}
    _fitted_scalars: ClassVar[dict[str, list]] = {}

    def fit(self, X, y, *, progress: ProgressCallback | None = None) -> FeatureHead:
        """Learn from features *X* ``(n, d)`` and labels *y*; *progress* hears how training advances."""
        try:
            self._validate_params()
        except InvalidParameterError as err:
            raise InvalidParameter(str(err)) from None
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has one class ({self.classes_[0]!r}); a classifier needs at least two.")
        self.mean_, std = column_moments(X)
        constant = std <= CONSTANT_STD * np.abs(self.mean_) + np.finfo(np.float64).tiny
        self.scale_ = np.where(constant, 1.0, std)
        self._fit(X, y_index, progress or _ignore_progress)
        return self

    def _fit(self, X: np.ndarray, y: np.ndarray, progress: ProgressCallback) -> None:  # pragma: no cover
        """Learn from float32 features and class indices (``mean_``, ``scale_`` and ``classes_`` are set)."""
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:  # pragma: no cover - interface
        """``(n, n_classes)`` probabilities, columns in the order of ``classes_``."""
        raise NotImplementedError

    @classmethod
    def search_space(cls, trial) -> dict:  # pragma: no cover - interface
        """Hyper-parameters for ``xferkit tune``, sampled from an Optuna *trial*."""
        raise NotImplementedError

    def torch_modules(self) -> dict:  # pragma: no cover - interface
        """torch modules computing ``predict_proba`` from raw features in float32, by method (for export).

        A head whose predictions can only be approximated offers each approximation; the exporter
        keeps the one closest to ``predict_proba``.
        """
        raise NotImplementedError

    def predict(self, X) -> np.ndarray:
        """The most probable label of each row."""
        proba = self.predict_proba(X)  # first: it checks that the head is fitted
        return self.classes_[proba.argmax(axis=1)]

    def uncertainty(self, X) -> dict[str, np.ndarray]:
        """Per-example uncertainty; the default is the predictive entropy in nats."""
        return {"entropy": predictive_entropy(self.predict_proba(X))}

    def _validated(self, X) -> np.ndarray:
        """*X* checked against the fitted head (fitted, same number of features), as float64."""
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=np.float64)

    def _standardised(self, X: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """*X* centred and scaled by the training statistics: float32 to train on, float64 to predict."""
        return (X.astype(dtype, copy=False) - self.mean_.astype(dtype)) / self.scale_.astype(dtype)

    # --- persistence -------------------------------------------------------------------------------
    def _fitted_arrays(self) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        """The learned arrays ``save`` writes to ``head.safetensors`` (besides ``mean_`` and ``scale_``)."""
        raise NotImplementedError

    def _array_specs(self, arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:  # pragma: no cover
        """What ``_fitted_arrays`` writes for these parameters and fitted scalars, checked before a restore.

        *arrays* are the saved ones, for sizes only they record; a head that reads them checks them first.
        """
        raise NotImplementedError

    def _restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:  # pragma: no cover - interface
        """Rebuild the learned state from ``_fitted_arrays`` (the JSON scalars are already set)."""
        raise NotImplementedError

    def save(self, folder: str | Path) -> None:
        """Write ``head.json`` (name, hyper-parameters, fitted scalars, classes) and ``head.safetensors``."""
        check_is_fitted(self)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean_, "scale": self.scale_, **self._fitted_arrays()}
        # bytes, then a plain write: a full disk is an OSError the caller can name, not a SafetensorError
        arrays = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
        (folder / ARRAYS).write_bytes(safetensors_bytes(arrays))
        params = {key: _json_or_none(value) for key, value in self.get_params().items()}
        meta = {"name": self.name, "params": params,
                "fitted": {key: plain(getattr(self, key)) for key in self._fitted_scalars},
                "classes": [plain(label) for label in self.classes_.tolist()],
                "classes_dtype": self.classes_.dtype.str, "n_features_in": int(self.n_features_in_)}
        (folder / META).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> FeatureHead:
        """The head saved in *folder*: on ``FeatureHead`` whichever head it is, on a subclass that one.

        Both files are checked against what ``save`` writes before anything is built from them; a
        file that does not pass is an XferkitError naming it. Nothing in them is executed.
        """
        folder = Path(folder)
        with blame(folder / META):
            meta = read_json_object(folder / META)
            estimator = cls._class_to_load(meta.get("name"), folder)
            expect_keys(meta, META_KEYS)
            expect_keys(meta["params"], estimator().get_params(), "params")
            head = estimator(**meta["params"])
            checked(head._validate_params)
            head.classes_ = checked_classes(meta["classes"], meta["classes_dtype"])
            head.n_features_in_ = meta["n_features_in"]
            require(_is_integer(head.n_features_in_) and head.n_features_in_ > 0,
                    f"n_features_in must be a positive integer, not {head.n_features_in_!r}")
            expect_keys(meta["fitted"], head._fitted_scalars, "fitted")
            checked(validate_parameter_constraints, head._fitted_scalars, meta["fitted"],
                    type(head).__name__)
            for key, value in meta["fitted"].items():
                setattr(head, key, value)
        with blame(folder / ARRAYS):
            arrays = read_safetensors(folder / ARRAYS, load_file)
            statistics = {key: ArraySpec((head.n_features_in_,)) for key in ("mean", "scale")}
            expect_arrays(arrays, statistics, complete=False)
            expect_arrays(arrays, {**statistics, **head._array_specs(arrays)})
            require(bool((arrays["scale"] > 0).all()), "array 'scale' holds values <= 0")
            head.mean_, head.scale_ = arrays.pop("mean"), arrays.pop("scale")
            head._restore_arrays(arrays)
        return head

    @classmethod
    def _class_to_load(cls, name: Any, folder: Path) -> type[FeatureHead]:
        """The class of a saved *name* head: any registered one for ``FeatureHead``, else *cls* itself."""
        if cls is not FeatureHead:
            if name != cls.name:
                raise XferkitError(f"{folder} holds a {name!r} head, not a {cls.name!r} one.")
            return cls
        require(isinstance(name, str) and name in FEATURE_HEADS,
                f"holds an unknown head {name!r}; known: {', '.join(FEATURE_HEADS)}")
        module, attribute = FEATURE_HEADS[name].split(":")
        return getattr(import_module(module), attribute)


# --- checks of saved arrays (the shared checks of saved files are in xferkit.core.saved) -------------
def expect_arrays(arrays: dict[str, np.ndarray], specs: dict[str, ArraySpec], complete: bool = True) -> None:
    """*arrays* must hold *specs*' arrays (and no other, when *complete*), each of its shape and dtype."""
    missing = sorted(set(specs) - set(arrays))
    unknown = sorted(set(arrays) - set(specs)) if complete else []
    require(not missing, f"lacks the arrays {', '.join(missing)}")
    require(not unknown, f"has unexpected arrays {', '.join(unknown)}")
    for key, spec in specs.items():
        array, dtype = arrays[key], np.dtype(spec.dtype)
        fits = len(array.shape) == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape, array.shape, strict=True))
        shape = tuple("n" if n is None else n for n in spec.shape)
        require(fits and array.dtype == dtype, f"array {key!r} is {array.dtype} of shape {array.shape}, "
                                               f"not {dtype} of shape {shape}")
        require(not spec.finite or array.dtype.kind != "f" or bool(np.isfinite(array).all()),
                f"array {key!r} holds NaN or infinite values")


def _is_integer(value: Any) -> bool:
    """A JSON integer, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def _json_or_none(value: Any) -> Any:
    """*value* as JSON can hold it, or ``None`` if it cannot (a RandomState instance)."""
    try:
        json.dumps(plain(value))
    except (TypeError, ValueError):
        return None
    return plain(value)


def _ignore_progress(done: int, total: int, info: str) -> None:
    """The progress callback of a caller who did not ask for one."""


def draw_seed(random_state) -> int:
    """An integer seed from *random_state* (int, RandomState or None), kept by a head to repeat its draws."""
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def stratified_holdout(y: np.ndarray, fraction: float, random_state) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) of *y*: *fraction* of each class held out, rounded, one example always kept.

    A class too small for its share to round to one example stays wholly in the kept part.
    """
    rng = check_random_state(random_state)
    held_out = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        held_out.append(members[:min(len(members) - 1, int(fraction * len(members) + 0.5))])
    held_out = np.sort(np.concatenate(held_out))
    return np.setdiff1d(np.arange(len(y)), held_out), held_out
