"""The interface every head shares: scikit-learn's estimator shape plus safetensors save/load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from xferkit.errors import XferkitError


class Head(ClassifierMixin, BaseEstimator):
    """A classifier on backbone features (or, for image heads, on image paths).

    Subclasses declare hyper-parameters as keywords of ``__init__`` (stored as given),
    learn in ``fit`` (attributes ending in ``_``), and move their learned tensors through
    ``_get_state`` / ``_set_state`` so that ``save``/``load`` never pickle anything.
    """

    name: ClassVar[str]
    #: "features" heads get a 2-D float array; "images" heads get a list of image paths.
    input_kind: ClassVar[str] = "features"

    def fit(self, X, y, X_val=None, y_val=None) -> Head:  # pragma: no cover - interface
        """Learn from ``X, y``; validation data, when given, picks hyper-parameters or stops early."""
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:  # pragma: no cover - interface
        """``(n, n_classes)`` probabilities, columns in the order of ``classes_``."""
        raise NotImplementedError

    @classmethod
    def search_space(cls, trial) -> dict:  # pragma: no cover - interface
        """Hyper-parameters for ``xferkit tune``, sampled from an Optuna *trial*."""
        raise NotImplementedError

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def uncertainty(self, X) -> dict[str, np.ndarray]:
        """Per-example uncertainty; the default is the predictive entropy in nats."""
        return {"entropy": predictive_entropy(self.predict_proba(X))}

    # --- persistence -----------------------------------------------------------------------
    def _get_state(self) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def _set_state(self, state: dict[str, torch.Tensor], info: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    def _get_info(self) -> dict:
        """JSON-able learned values that are not tensors (a chosen C, an epoch count, ...)."""
        return {}

    def save(self, folder: str | Path) -> None:
        """Write ``head.json`` (name, hyper-parameters, learned scalars) and ``head.safetensors``."""
        check_is_fitted(self, "classes_")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self._get_state().items()}
        state["classes_"] = torch.as_tensor(self.classes_)
        save_file(state, folder / "head.safetensors")
        meta = {"head": self.name, "params": _jsonable(self.get_params()), "info": self._get_info()}
        (folder / "head.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> Head:
        """Rebuild the head saved in *folder* (dispatching on its recorded name)."""
        from xferkit.heads import get_head_class

        folder = Path(folder)
        try:
            meta = json.loads((folder / "head.json").read_text())
            state = load_file(folder / "head.safetensors")
        except (OSError, ValueError) as err:
            raise XferkitError(f"{folder} does not hold a readable head ({err}).") from err
        head = get_head_class(meta["head"])(**meta["params"])
        head.classes_ = state.pop("classes_").numpy()
        head._set_state(state, meta["info"])
        return head


def predictive_entropy(proba: np.ndarray) -> np.ndarray:
    return -(proba * np.log(np.clip(proba, 1e-12, 1.0))).sum(axis=1)


def check_positive(**values: float) -> None:
    """Raise a clear error for hyper-parameters that must be > 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise XferkitError(f"{name} must be positive, got {value}.")


def _jsonable(params: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}
