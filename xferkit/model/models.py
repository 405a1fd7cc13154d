"""A repurposed model: the one place where "features, then a head" and "a network on pixels" differ.

:class:`FeatureModel` runs the backbone once and fits a scikit-learn head on the features;
:class:`NetworkModel` trains a network on the images themselves. Both calibrate their
probabilities with one shared temperature fitted on held-out images, save to a folder of JSON
and safetensors, and predict on image files the same way; nothing above this module branches
on which one it holds.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold

from xferkit.backbones import Backbone, create_backbone
from xferkit.core.calibration import Calibration, calibrate, temper
from xferkit.core.errors import XferkitError
from xferkit.core.metrics import classification_metrics, predictive_entropy
from xferkit.core.ood import ClassMeans
from xferkit.core.reporting import SILENT, Reporter
from xferkit.core.threads import thread_budget
from xferkit.features import Features, extract_features, readable_images
from xferkit.finetune.base import PixelClassifier
from xferkit.finetune.loop import EpochEnd
from xferkit.heads.base import FeatureHead
from xferkit.io.data import LabelledImages
from xferkit.io.files import atomic_folder
from xferkit.model.held_out import CLASS_MEANS, HeldOut, load_class_means, save_class_means
from xferkit.model.manifest import MANIFEST, Manifest, damaged, read_manifest
from xferkit.model.options import BackboneOptions, ExtractOptions
from xferkit.model.registry import create_head, head_kind, head_params
from xferkit.model.sharded import every_label, gathered_predictions, shared_class_means, streams
from xferkit.preprocess import Preprocess

#: Validation accuracy less than this above always answering the commonest class means "did not learn".
NEAR_CHANCE = 0.05


@dataclass
class Predictions:
    """Calibrated probabilities (columns follow ``classes``) and uncertainties of the images that decoded."""

    proba: np.ndarray
    uncertainty: dict[str, np.ndarray]
    kept: np.ndarray
    skipped: list[tuple[Path, str]]


@dataclass
class Fitted:
    """What fitting produced besides the model: the skipped files and how long each part took."""

    skipped: list[tuple[Path, str]]
    seconds: dict[str, float]


class TransferModel(ABC):
    """A fitted estimator on images, its class names, calibration, validation metrics and run info."""

    kind: ClassVar[str]

    def __init__(self, estimator, classes: list[str], calibration: Calibration | None = None,
                 metrics: dict | None = None, info: dict | None = None):
        self.estimator, self.classes = estimator, list(classes)
        self.calibration, self.metrics, self.info = calibration, metrics or {}, info or {}
        #: Class means of the training features (the ``distance`` score) and the held-out record.
        self.class_means: ClassMeans | None = None
        self.held_out: HeldOut | None = None

    @property
    def head(self) -> str:
        return self.estimator.name

    @property
    @abstractmethod
    def backbone_spec(self) -> dict:
        """The backbone this model starts from, as recorded in the manifest."""

    @property
    @abstractmethod
    def n_features(self) -> int:
        """The length of the feature vectors the OOD distance is measured on."""

    @abstractmethod
    def _raw_predictions(self, paths: list[Path], options: ExtractOptions, reporter: Reporter
                         ) -> tuple[np.ndarray, dict[str, np.ndarray], Features]:
        """Uncalibrated probabilities, head-specific uncertainties, and the decoded images' features."""

    # --- prediction --------------------------------------------------------------------------------
    def predict(self, paths: list[Path], options: ExtractOptions = ExtractOptions(),
                reporter: Reporter = SILENT) -> Predictions:
        """Calibrated probabilities and uncertainties (always the entropy) of the images that decode."""
        proba, extra, feats = self._raw_predictions([Path(p) for p in paths], options, reporter)
        proba = temper(proba, self.calibration.temperature) if self.calibration else proba
        return Predictions(proba, self._uncertainty(proba, extra, feats.features), feats.kept, feats.skipped)

    def _uncertainty(self, proba: np.ndarray, extra: dict[str, np.ndarray], features: np.ndarray
                     ) -> dict[str, np.ndarray]:
        """The entropy of *proba*, the head's own scores, and the distance to the class means (if known)."""
        distance = {}  # where extra has it (held out elsewhere), that one counts
        if self.class_means and "distance" not in extra:
            distance = {"distance": self.class_means.distance(features)}
        return {"entropy": predictive_entropy(proba), **distance, **extra}

    # --- fitting -----------------------------------------------------------------------------------
    def _validated(self, val: LabelledImages | None, options: ExtractOptions, calibrated: bool,
                   reporter: Reporter, predict: Callable | None = None) -> list[tuple[Path, str]]:
        """Calibrate and score the model on *val*, record its held-out scores there; the skipped files.

        ``predict``: what gives the raw predictions, when not :meth:`_raw_predictions`.
        """
        if val is None or not len(val):
            return []
        proba, extra, feats = (predict or self._raw_predictions)(val.paths, options, reporter)
        if not len(feats.kept):
            return feats.skipped
        self._held_out(proba, extra, feats.features, val.relabel(self.classes).labels[feats.kept],
                       "validation split", calibrated, reporter)
        return feats.skipped

    def _held_out(self, proba: np.ndarray, extra: dict[str, np.ndarray], features: np.ndarray, y: np.ndarray,
                  source: str, calibrated: bool, reporter: Reporter) -> None:
        """From held-out predictions: the temperature (when asked), the metrics and the held-out record."""
        if calibrated:
            self.calibration = calibrate(proba, y)
            proba = temper(proba, self.calibration.temperature)
        self.metrics = classification_metrics(y, proba)
        self.held_out = HeldOut.of(proba, y, self._uncertainty(proba, extra, features), self.head, source)
        chance, accuracy = np.bincount(y).max() / len(y), self.metrics["accuracy"]
        if accuracy < chance + NEAR_CHANCE:
            reporter.warn(f"the {self.head} head did not learn: validation accuracy {accuracy:.2f} is about "
                          f"what always answering the commonest class gets ({chance:.2f}). Try lr "
                          "(the robust default), another --learning-rate or more --epochs, or check the data "
                          "and the backbone's weights.")

    # --- persistence -------------------------------------------------------------------------------
    def manifest(self) -> Manifest:
        return Manifest(self.kind, self.backbone_spec, self.classes, self.head,
                        _jsonable(self.estimator.get_params()),
                        self.calibration.to_json() if self.calibration else None, self.metrics, self.info,
                        self.held_out.to_json() if self.held_out else None)

    def save(self, folder: str | Path, force: bool = False) -> Path:
        """Write the model folder atomically; an existing folder needs ``force``."""
        with atomic_folder(Path(folder), force=force) as tmp:
            self.estimator.save(tmp)
            if self.class_means is not None:
                save_class_means(self.class_means, tmp)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest().to_json(), indent=2))
        return Path(folder)

    @classmethod
    @abstractmethod
    def _load(cls, folder: Path, manifest: Manifest) -> TransferModel:
        """Rebuild the model saved in *folder*."""


class FeatureModel(TransferModel):
    """A backbone that extracts features once and a scikit-learn head fitted on them."""

    kind = "features"

    def __init__(self, backbone: Backbone, head: FeatureHead, **kwargs):
        super().__init__(head, [str(c) for c in head.classes_], **kwargs)
        self.backbone = backbone

    @property
    def backbone_spec(self) -> dict:
        return self.backbone.spec()

    @property
    def n_features(self) -> int:
        return self.backbone.num_features

    def features(self, paths: list[Path], options: ExtractOptions, reporter: Reporter = SILENT) -> Features:
        return _extract(self.backbone, paths, options, reporter)

    def _raw_predictions(self, paths, options, reporter):
        feats = self.features(paths, options, reporter)
        if not len(feats.kept):
            return np.zeros((0, len(self.classes)), np.float32), {}, feats
        extra = {k: v for k, v in self.estimator.uncertainty(feats.features).items() if k != "entropy"}
        return self.estimator.predict_proba(feats.features), extra, feats

    @classmethod
    def fit(cls, head: str, params: dict, backbone: BackboneOptions, train: LabelledImages,
            val: LabelledImages | None, options: ExtractOptions, seed: int, calibrated: bool,
            reporter: Reporter, epoch_end: EpochEnd | None = None, folds: int = 0
            ) -> tuple[FeatureModel, Fitted]:
        estimator = create_head(head, **_with_run_params(head, params, backbone, options, seed))
        net = create_backbone(backbone.name, backbone.weights, backbone.pretrained, backbone.layer,
                              backbone.image_size, reporter)
        # lr under torchrun: each rank fits on its own rows. The other heads (and cross-fitting) keep the
        # gathered path below: every rank holds all the features and fits the same head on them.
        if streams(head, folds):
            return cls._fit_own_rows(estimator, net, train, val, options, calibrated, reporter)
        feats = _extract(net, train.paths, options, reporter)
        y = _names(train)[feats.kept]
        _check_every_class_left(y, train.classes)
        monitor = {}
        if epoch_end is not None and val is not None and len(val):  # the head validates on val's features
            held = _extract(net, val.paths, options, reporter)
            monitor = {"epoch_end": epoch_end, "validation": (held.features, _names(val)[held.kept])}
        seconds = _timed_fit(estimator, feats.features, y, reporter, **monitor)
        model = cls(net, estimator)
        model.class_means = ClassMeans.fit(feats.features, _indices(y), len(model.classes))
        if folds:
            model._cross_fitted(feats.features, y, folds, seed, calibrated, reporter)
        return model, Fitted(feats.skipped + model._validated(val, options, calibrated, reporter), seconds)

    @classmethod
    def _fit_own_rows(cls, estimator: FeatureHead, net: Backbone, train: LabelledImages,
                      val: LabelledImages | None, options: ExtractOptions, calibrated: bool,
                      reporter: Reporter) -> tuple[FeatureModel, Fitted]:
        """:meth:`fit` with the training features left on the ranks that extracted them (see ``sharded``)."""
        feats = _extract(net, train.paths, options, reporter, gather=False)
        y = _names(train)[feats.kept]
        _check_every_class_left(every_label(y), train.classes)
        seconds = _timed_fit(estimator, feats.features, y, reporter, method="fit_streamed", sharded=True)
        model = cls(net, estimator)
        model.class_means = shared_class_means(feats.features, np.searchsorted(estimator.classes_, y),
                                               len(model.classes))
        skipped = model._validated(val, options, calibrated, reporter, predict=model._predicted_own_rows)
        return model, Fitted(feats.skipped + skipped, seconds)

    def _predicted_own_rows(self, paths: list[Path], options: ExtractOptions, reporter: Reporter):
        """:meth:`_raw_predictions`, each rank predicting the images it extracted; predictions gathered."""
        own = _extract(self.backbone, paths, options, reporter, gather=False)
        return gathered_predictions(self.estimator, self.class_means, own)

    def _cross_fitted(self, X: np.ndarray, y: np.ndarray, folds: int, seed: int, calibrated: bool,
                      reporter: Reporter) -> None:
        """Held-out predictions of the training set itself, each fold's by a copy of the head fitted on
        the other folds (and the distance to their class means): they calibrate the model fitted on all."""
        index = _indices(y)
        smallest = int(np.bincount(index).min())
        if smallest < 2:
            raise XferkitError("cross-fitting holds out part of every class: each class needs at least 2 "
                               "readable images.")
        proba, extra = np.zeros((len(y), len(self.classes))), {}
        splitter = StratifiedKFold(min(folds, smallest), shuffle=True, random_state=seed)
        with reporter.task(f"cross-fitting {self.head}", splitter.get_n_splits(), unit="fold") as task, \
                thread_budget():
            for fit_rows, held_rows in splitter.split(X, index):
                head = clone(self.estimator).fit(X[fit_rows], y[fit_rows])
                proba[held_rows] = head.predict_proba(X[held_rows])
                means = ClassMeans.fit(X[fit_rows], index[fit_rows], len(self.classes))
                scores = {**head.uncertainty(X[held_rows]), "distance": means.distance(X[held_rows])}
                for key, values in scores.items():
                    extra.setdefault(key, np.zeros(len(y)))[held_rows] = values
                task.advance()
        extra.pop("entropy", None)  # recomputed from the calibrated probabilities
        self._held_out(proba, extra, X, index, f"{splitter.get_n_splits()}-fold cross-fitting on the "
                       "training images", calibrated, reporter)

    @classmethod
    def _load(cls, folder: Path, manifest: Manifest) -> FeatureModel:
        spec, path = manifest.backbone, folder / MANIFEST
        try:
            backbone = create_backbone(spec["name"], spec["weights_file"], spec["pretrained"], spec["layer"])
        except (XferkitError, RuntimeError) as err:  # timm refuses an unknown tag with a RuntimeError
            raise XferkitError(f"{path}: the backbone it records cannot be built: {err}") from None
        check_same_weights(backbone.weights_digest, spec["weights_digest"], spec["name"],
                           backbone.weights_source, path)
        head = FeatureHead.load(folder)
        if head.n_features_in_ != backbone.num_features:
            raise damaged(path, f"does not match the saved head: its backbone gives {backbone.num_features} "
                                f"features, the head in head.json takes {head.n_features_in_}")
        return cls(replace(backbone, preprocess=Preprocess.from_json(spec["preprocess"])), head)


class NetworkModel(TransferModel):
    """A classifier network trained on pixels (fine-tuned, or from scratch)."""

    kind = "pixels"

    def __init__(self, trainer: PixelClassifier, **kwargs):
        super().__init__(trainer, [str(c) for c in trainer.classes_], **kwargs)

    @property
    def backbone_spec(self) -> dict:
        return self.estimator.backbone_.spec()

    @property
    def n_features(self) -> int:
        return self.estimator.network_.classifier.in_features

    def _raw_predictions(self, paths, options, reporter):
        proba, feats = self.estimator.predict_images(paths, device=options.device,
                                                     batch_size=options.batch_size, workers=options.workers,
                                                     strict=options.strict, reporter=reporter)
        return proba, {}, feats

    @classmethod
    def fit(cls, head: str, params: dict, backbone: BackboneOptions, train: LabelledImages,
            val: LabelledImages | None, options: ExtractOptions, seed: int, calibrated: bool,
            reporter: Reporter, epoch_end: EpochEnd | None = None, folds: int = 0
            ) -> tuple[NetworkModel, Fitted]:
        if folds:
            raise XferkitError(f"cross-fitting refits the head once per fold: it is for feature heads, not "
                               f"{head}, which keeps its validation split.")
        estimator = create_head(head, **_with_run_params(head, params, backbone, options, seed))
        kept, skipped = readable_images(train.paths, device=options.device, batch_size=options.batch_size,
                                        workers=options.workers, strict=options.strict, reporter=reporter)
        y = _names(train)[kept]
        _check_every_class_left(y, train.classes)
        seconds = _timed_fit(estimator, [train.paths[i] for i in kept], y, reporter, epoch_end=epoch_end)
        model = cls(estimator)
        trained = model._raw_predictions([train.paths[i] for i in kept], options, reporter)[2]
        model.class_means = ClassMeans.fit(trained.features, _indices(y[trained.kept]), len(model.classes))
        return model, Fitted(skipped + model._validated(val, options, calibrated, reporter), seconds)

    @classmethod
    def _load(cls, folder: Path, manifest: Manifest) -> NetworkModel:
        return cls(PixelClassifier.load(folder))


MODEL_TYPES: dict[str, type[TransferModel]] = {"features": FeatureModel, "pixels": NetworkModel}


def fit_model(head: str, params: dict | None = None, *, backbone: BackboneOptions = BackboneOptions(),
              train: LabelledImages, val: LabelledImages | None = None,
              options: ExtractOptions = ExtractOptions(), seed: int = 0, calibrated: bool = True,
              info: dict | None = None, reporter: Reporter = SILENT, epoch_end: EpochEnd | None = None,
              folds: int = 0) -> tuple[TransferModel, Fitted]:
    """Fit head *head* (with hyper-parameters *params*) on *train*; calibrate and score it on *val*.

    ``folds`` > 1 (feature heads, no *val*): calibrate on out-of-fold predictions of *train* instead.

    ``epoch_end(epoch, val_nll) -> stop``, for heads that train by epochs (an ``epochs`` parameter),
    hears each epoch's validation NLL (*val*'s for feature heads, the trainer's own hold-out for pixel
    trainers); True stops training there.
    """
    model, fitted = MODEL_TYPES[head_kind(head)].fit(head, dict(params or {}), backbone, train, val, options,
                                                      seed, calibrated, reporter, epoch_end, folds)
    model.info = {**(info or {}), "n_train": int(len(train) - _skipped_in(train, fitted.skipped)),
                  "n_val": int(model.metrics.get("n", 0)), "seed": seed,
                  "fit_seconds": round(fitted.seconds["fit"], 3)}
    return model, fitted


def load_model(folder: str | Path) -> TransferModel:
    """Rebuild the model saved in *folder*, each file checked before use; never runs code from it.

    A ``.onnx`` file that ``xferkit export`` wrote loads as an ``OnnxModel``, which predicts the same way.
    """
    folder = Path(folder)
    if folder.suffix.lower() == ".onnx":
        from xferkit.model.onnx.runtime import OnnxModel  # imports this module: loaded on first use

        return OnnxModel.load(folder)
    manifest = read_manifest(folder)
    model = MODEL_TYPES[manifest.kind]._load(folder, manifest)
    params = _jsonable(model.estimator.get_params())
    for what, recorded, saved in (("head names", manifest.head, model.head),
                                  ("classes", manifest.classes, model.classes),
                                  ("head params", manifest.head_params, params)):
        if recorded != saved:
            raise damaged(folder / MANIFEST, f"does not match the saved head: the {what} differ between "
                                             f"{MANIFEST} and head.json (the folder was edited or mixed up)")
    model.calibration = Calibration(**manifest.calibration) if manifest.calibration else None
    model.held_out = HeldOut.from_json(manifest.held_out) if manifest.held_out else None
    model.class_means = load_class_means(folder, len(model.classes), model.n_features)
    if model.held_out and model.held_out.ood_score == "distance" and model.class_means is None:
        raise damaged(folder / MANIFEST, f"records OOD scores by distance but the folder lacks {CLASS_MEANS}")
    model.metrics, model.info = manifest.validation_metrics, manifest.info
    return model


def check_same_weights(found: str, recorded: str, name: str, source: str, record: Path) -> None:
    """Refuse weights other than those a model was trained on (as *record* records them)."""
    if found != recorded:
        raise XferkitError(
            f"the weights found for {name} ({source}) are not the ones this model was trained on "
            f"(digest {found[:12]} here, {recorded[:12]} recorded in {record}). Restore the original weights "
            "file.")


def _with_run_params(head: str, params: dict, backbone: BackboneOptions, options: ExtractOptions,
                     seed: int) -> dict:
    """*params* plus what the run decides (backbone, device, seed, ...) for the parameters the head takes."""
    run = {"backbone": backbone.name, "weights": str(backbone.weights) if backbone.weights else None,
           "pretrained": backbone.pretrained, "layer": backbone.layer, "image_size": backbone.image_size,
           "device": options.device, "batch_size": options.batch_size, "workers": options.workers,
           "random_state": seed}
    declared = head_params(head)
    return {**{k: v for k, v in run.items() if k in declared}, **params}


def _timed_fit(estimator, X, y: np.ndarray, reporter: Reporter, method: str = "fit", **monitor
               ) -> dict[str, float]:
    """Fit *estimator* by *method*, drawing its progress; *monitor* (``epoch_end``...) goes to that method."""
    start = time.perf_counter()
    with reporter.callback(f"fitting {estimator.name}") as progress, thread_budget():
        getattr(estimator, method)(X, y, progress=progress, **monitor)
    return {"fit": time.perf_counter() - start}


def _extract(backbone: Backbone, paths: list[Path], options: ExtractOptions, reporter: Reporter,
             gather: bool = True) -> Features:
    return extract_features(backbone, paths, device=options.device, batch_size=options.batch_size,
                            workers=options.workers, cache=options.cache, strict=options.strict,
                            gather=gather, reporter=reporter)


def _indices(names: np.ndarray) -> np.ndarray:
    """Class indices of class *names*, in the sorted order a head's ``classes_`` takes."""
    return np.unique(names, return_inverse=True)[1]


def _names(data: LabelledImages) -> np.ndarray:
    """The class name of every image: heads learn the names themselves."""
    return np.array(data.classes, dtype=object)[data.labels].astype(str)


def _check_every_class_left(y: np.ndarray, classes: list[str]) -> None:
    empty = sorted(set(classes) - set(y.tolist()))
    if empty:
        raise XferkitError(f"no readable training images left for class(es) {', '.join(empty)}: "
                           "every file there failed to decode. Add valid images or remove them.")


def _skipped_in(data: LabelledImages, skipped: list[tuple[Path, str]]) -> int:
    paths = set(data.paths)
    return sum(1 for path, _ in skipped if path in paths)


def _jsonable(params: dict) -> dict:
    """Hyper-parameters as JSON values (numpy scalars unwrapped, paths as text)."""
    return {k: (v.item() if isinstance(v, np.generic) else str(v) if isinstance(v, Path) else v)
            for k, v in params.items()}
