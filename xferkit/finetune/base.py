"""PixelClassifier: the scikit-learn estimator shared by the trainers that learn from image pixels.

The backbone is a parameter (a name, as skorch takes ``module``), so ``sklearn.base.clone`` gives
an unfitted copy. ``fit`` builds the backbone and the network, holds out a stratified validation
split for early stopping, and trains. ``save`` writes JSON and safetensors, never a pickle.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib import import_module
from numbers import Integral, Real
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, InvalidParameterError
from sklearn.utils.validation import check_is_fitted
from torch import nn

from xferkit.backbones import Backbone
from xferkit.core import distributed
from xferkit.core.devices import resolve_device
from xferkit.core.errors import InvalidParameter, XferkitError
from xferkit.core.metrics import predictive_entropy
from xferkit.core.reporting import SILENT, ProgressCallback, Reporter
from xferkit.core.saved import (
    blame,
    checked,
    checked_classes,
    expect_keys,
    read_json_object,
    read_safetensors,
    require,
)
from xferkit.features import Features, extract_features
from xferkit.finetune import PIXEL_TRAINERS
from xferkit.finetune.loaders import train_loader, validation_batches
from xferkit.finetune.loop import Budget, EpochEnd, train_classifier
from xferkit.finetune.network import ImageClassifier
from xferkit.io.data import LabelledImages, stratified_split
from xferkit.io.files import atomic_write_bytes
from xferkit.preprocess import Normalizer

#: What ``save`` writes into a folder.
MANIFEST, TENSORS = "head.json", "head.safetensors"


class PixelClassifier(ClassifierMixin, BaseEstimator):
    """A classifier network trained on image pixels: ``X`` are image paths, the backbone is a parameter.

    Subclasses declare their hyper-parameters as keywords of ``__init__`` and say how the backbone
    and the network are built and what trains; fitting, prediction and persistence live here.
    """

    #: The name ``save`` records and ``PIXEL_TRAINERS`` knows the class by.
    name: ClassVar[str]
    #: Checked at the start of ``fit`` (subclasses add their own).
    _parameter_constraints: ClassVar[dict] = {
        "backbone": [str],
        "image_size": [Interval(Integral, 8, 4096, closed="both"), None],  # as the CLI's --image-size
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "epochs": [Interval(Integral, 1, 100_000, closed="both")],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "max_time": [Interval(Real, 0, None, closed="neither"), None],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "device": [str],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "workers": [Interval(Integral, 0, None, closed="left"), None],
        "random_state": [Interval(Integral, 0, None, closed="left"), None],
        "sync_batchnorm": ["boolean"],
    }
    #: Parameters added since the saved format began, with the value a model saved before them had.
    _added_params: ClassVar[dict] = {"sync_batchnorm": False}

    # --- what each trainer defines ---------------------------------------------------------------
    @classmethod
    def search_space(cls, trial) -> dict:  # pragma: no cover - interface
        """Hyper-parameters for tuning, sampled from an Optuna *trial*."""
        raise NotImplementedError

    def _create_backbone(self) -> Backbone:  # pragma: no cover - interface
        """The backbone named by the parameters: the network's starting point and its preprocessing."""
        raise NotImplementedError

    def _build_network(self, backbone: Backbone, num_classes: int) -> ImageClassifier:  # pragma: no cover
        """The untrained network, frozen where it should be (the same every time, for ``load``)."""
        raise NotImplementedError

    def _prepare_training(self, network: ImageClassifier, seed: int
                          ) -> tuple[list[dict], Callable | None]:  # pragma: no cover - interface
        """Initialise what trains; AdamW groups and an optional replacement for ``optimizer.step()``."""
        raise NotImplementedError

    # --- fitting ---------------------------------------------------------------------------------
    def fit(self, X: Sequence, y: Sequence, *, progress: ProgressCallback | None = None,
            epoch_end: EpochEnd | None = None) -> PixelClassifier:
        """Train on image paths *X* with labels *y*, stopping early on a stratified hold-out of them.

        The hold-out is ``validation_fraction`` of each class (classes too small for one stay whole).
        ``progress(done, total, info)`` is called after every optimiser step (counted in batches);
        ``epoch_end(epoch, val_nll)`` after every epoch on the hold-out, and True from it stops training.
        Images that fail to decode are skipped.
        """
        self._check_params()
        paths, y = [Path(p) for p in X], np.asarray(y)
        if len(paths) != len(y):
            raise InvalidParameter(f"X has {len(paths)} images but y has {len(y)} labels.")
        classes, codes = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise InvalidParameter(f"a classifier needs at least two classes, y has {len(classes)}.")
        seed = int(np.random.SeedSequence(self.random_state).generate_state(1)[0])
        data = LabelledImages(paths, codes, list(classes))
        train, val = stratified_split(data, self.validation_fraction, seed)
        distributed.init()  # under torchrun: before the device is chosen ("cuda" is then this rank's GPU)
        backbone, device = self._create_backbone(), resolve_device(self.device)
        torch.manual_seed(seed)
        random.seed(seed)  # timm's random-resized crop draws from Python's generator
        network = self._build_network(backbone, len(classes)).to_device(device)
        groups, optimizer_step = self._prepare_training(network, seed)
        preprocess = backbone.preprocess
        loader = train_loader(train.paths, preprocess, device, self.batch_size, self.workers, seed)
        val_batches = val_labels = None
        if val is not None and len(val):
            part = distributed.shard(len(val))  # every image, without torchrun
            val_batches = validation_batches(val.paths[part.start:part.stop], preprocess, device,
                                             self.batch_size, self.workers)
            val_labels = torch.as_tensor(val.labels[part.start:part.stop], dtype=torch.long)
        budget = Budget(self.epochs, self.patience, self.max_time, self.label_smoothing)
        history = train_classifier(network, groups, loader, torch.as_tensor(train.labels, dtype=torch.long),
                                   val_batches, val_labels, Normalizer(preprocess, device), budget, progress,
                                   optimizer_step, epoch_end, self.sync_batchnorm)
        self.classes_, self.backbone_, self.history_ = classes, backbone, history
        self.network_ = network.cpu().eval()
        return self

    def _check_params(self) -> None:
        """Every hyper-parameter against ``_parameter_constraints``: one clear error for the first bad one."""
        try:
            self._validate_params()
        except InvalidParameterError as err:
            raise InvalidParameter(str(err)) from err

    # --- prediction ------------------------------------------------------------------------------
    def predict_images(self, paths: Sequence, *, device: str = "auto", batch_size: int = 64,
                       workers: int | None = None, strict: bool = False, reporter: Reporter = SILENT
                       ) -> tuple[np.ndarray, Features]:
        """Probabilities of the images that decode (``Features.kept``, ``skipped`` say which); never cached.

        ``Features.features`` are the trained network's pooled features.
        """
        check_is_fitted(self, "network_")
        body = replace(self.backbone_, model=self.network_.body)
        feats = extract_features(body, paths, device=device, batch_size=batch_size, workers=workers,
                                 cache=False, strict=strict, reporter=reporter)
        with torch.no_grad():
            logits = self.network_.classifier(torch.from_numpy(feats.features))
        return torch.softmax(logits, dim=1).numpy(), feats

    def torch_modules(self) -> dict[str, nn.Module]:
        """The trained network with a softmax: normalised images to probabilities (for export)."""
        check_is_fitted(self, "network_")
        return {"exact": nn.Sequential(self.network_.eval(), nn.Softmax(dim=1))}

    def predict_proba(self, X: Sequence) -> np.ndarray:
        """``(n, n_classes)`` probabilities for image paths; an unreadable file is an error here."""
        return self.predict_images(X, device=self.device, batch_size=self.batch_size, workers=self.workers,
                                   strict=True)[0]

    def predict(self, X: Sequence) -> np.ndarray:
        """The most probable class of each image path."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def uncertainty(self, X: Sequence) -> dict[str, np.ndarray]:
        """Per-image uncertainty: the predictive entropy in nats."""
        return {"entropy": predictive_entropy(self.predict_proba(X))}

    # --- persistence -----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write ``head.json`` (name, parameters, classes, history, base backbone) and the learned tensors."""
        check_is_fitted(self, "network_")
        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network_.learned_state().items()}
        manifest = {"name": self.name, "params": self.get_params(), "classes": self.classes_.tolist(),
                    "classes_dtype": self.classes_.dtype.str,
                    "info": {"history": self.history_, "backbone": self.backbone_.spec()}}
        atomic_write_bytes(folder / TENSORS, safetensors_bytes(state))
        atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2, default=_json_value).encode())

    @classmethod
    def load(cls, folder: str | Path) -> PixelClassifier:
        """The trainer saved in *folder*, of the class its name is registered for (this one or a subclass).

        Both files are checked against what ``save`` writes before they are used; a file that does not
        pass is an XferkitError naming it. Base weights other than those the model was trained on are
        refused where the network still uses them. Nothing in the folder is executed.
        """
        folder = Path(folder)
        meta_path, tensors_path = folder / MANIFEST, folder / TENSORS
        with blame(meta_path):
            manifest = read_json_object(meta_path)
            name = manifest.get("name")
            require(isinstance(name, str) and name in PIXEL_TRAINERS,
                    f"names an unknown pixel trainer {name!r}; known: {', '.join(PIXEL_TRAINERS)}")
            estimator = trainer_class(name)
            if not issubclass(estimator, cls):
                raise XferkitError(f"{folder} holds a {name} model, not a {cls.name} one.")
            expect_keys(manifest, ("name", "params", "classes", "classes_dtype", "info"))
            params = {**estimator._added_params, **manifest["params"]}  # saved before they were added
            expect_keys(params, estimator().get_params(), "params")
            require(all(value.isprintable() for value in params.values() if isinstance(value, str)),
                    "params hold a string with line breaks or control characters")
            trainer = estimator(**params)
            checked(trainer._validate_params)
            classes = checked_classes(manifest["classes"], manifest["classes_dtype"])
            info = manifest["info"]
            expect_keys(info, ("history", "backbone"), "info")
            recorded = info["backbone"].get("weights_digest") if isinstance(info["backbone"], dict) else None
            require(isinstance(info["history"], dict) and isinstance(recorded, str)
                    and re.fullmatch("[0-9a-f]{64}", recorded) is not None,
                    "info must hold a history object and a backbone with its weights_digest (a sha256)")
        try:
            backbone = trainer._create_backbone()
            network = trainer._build_network(backbone, len(classes))
        except (XferkitError, RuntimeError) as err:  # timm refuses an unknown tag with a RuntimeError
            raise XferkitError(f"{meta_path}: the network it describes cannot be built: {err}") from None
        with blame(tensors_path):
            state = read_safetensors(tensors_path, load_file)
        if set(state) != set(network.state_dict()) and backbone.weights_digest != recorded:
            raise XferkitError(
                f"the weights found for {backbone.name} ({backbone.weights_source}) are not the ones this "
                f"model was trained on (sha256 {backbone.weights_digest[:12]}, recorded {recorded[:12]} in "
                f"{meta_path}). Restore the original weights file, or train the model again on them.")
        with blame(tensors_path):
            _expect_tensors(state, network, f"the {name} network {MANIFEST} describes")
        network.load_state_dict(state, strict=False)
        trainer.classes_, trainer.backbone_, trainer.history_ = classes, backbone, info["history"]
        trainer.network_ = network.eval()
        return trainer


def trainer_class(name: str) -> type[PixelClassifier]:
    """The pixel trainer registered as *name* in ``PIXEL_TRAINERS`` (imported on first use)."""
    if name not in PIXEL_TRAINERS:
        raise XferkitError(f"unknown pixel trainer {name!r}; choose one of {', '.join(PIXEL_TRAINERS)}.")
    module, attribute = PIXEL_TRAINERS[name].split(":")
    return getattr(import_module(module), attribute)


# --- checks of saved tensors (the shared checks of saved files are in xferkit.core.saved) ------------
def _expect_tensors(state: dict[str, torch.Tensor], network: ImageClassifier, what: str) -> None:
    """*state* must be exactly *network*'s learned tensors: shapes, dtypes, finite, variances >= 0."""
    expected = network.learned_state()
    differ = sorted(set(state) ^ set(expected))
    require(not differ, f"does not fit {what} ({len(differ)} tensors missing or unexpected: "
                        f"{', '.join(differ[:3])})")
    for key, want in expected.items():
        got = state[key]
        require(got.shape == want.shape and got.dtype == want.dtype,
                f"tensor {key!r} is {got.dtype} of shape {tuple(got.shape)}, not {want.dtype} of shape "
                f"{tuple(want.shape)}")
        require(not got.is_floating_point() or bool(got.isfinite().all()),
                f"tensor {key!r} holds NaN or infinite values")
    variances = {f"{name}.running_var" for name, module in network.named_modules()
                 if getattr(module, "running_var", None) is not None}
    negative = sorted(key for key in variances & set(state) if bool((state[key] < 0).any()))
    require(not negative, f"tensor {', '.join(negative[:1])!r} holds negative variances")


def _json_value(value):
    """Paths and numpy scalars as JSON: the only non-JSON parameter values the constraints let through."""
    return value.item() if isinstance(value, np.generic) else os.fspath(value)
