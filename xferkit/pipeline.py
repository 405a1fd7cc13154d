"""The library behind each command: repurpose, evaluate, predict and extract, callable from Python."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from xferkit.artifacts import atomic_write_bytes
from xferkit.backbones import Backbone, create_backbone
from xferkit.data import LabelledImages, Splits, expand_image_paths, load_splits, read_image_folder
from xferkit.errors import XferkitError
from xferkit.features import Features, extract_features
from xferkit.heads import Head, create_head, get_head_class
from xferkit.heads.base import predictive_entropy
from xferkit.metrics import classification_metrics, confusion, per_class_report
from xferkit.model import TransferModel
from xferkit.training import readable_images


@dataclass
class ExtractOptions:
    """How images go through the backbone: device, batching, decode workers, cache, strictness."""

    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    cache_dir: Path | None | bool = None
    strict: bool = False
    progress: bool = True


@dataclass
class BackboneOptions:
    """Which backbone and weights: ``name`` (timm, or ``tv:`` torchvision) and where weights come from."""

    name: str = "resnet18"
    weights: Path | None = None
    pretrained: bool = True
    layer: str | None = None
    image_size: int | None = None

    def create(self) -> Backbone:
        backbone = create_backbone(self.name, self.weights, self.pretrained, self.layer)
        if self.image_size:
            backbone.preprocess = backbone.preprocess.with_image_size(self.image_size)
        return backbone


@dataclass
class LabelledFeatures:
    """Features (image paths, for heads that train on pixels) with labels, unreadable files dropped."""

    X: np.ndarray | list[Path]
    y: np.ndarray
    skipped: list[tuple[Path, str]]


@dataclass
class RepurposeResult:
    model: TransferModel
    skipped: list[tuple[Path, str]]
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def labelled_features(backbone: Backbone, data: LabelledImages, options: ExtractOptions
                      ) -> LabelledFeatures:
    feats = extract_features(backbone, data.paths, **asdict(options))
    return LabelledFeatures(feats.features, data.labels[feats.kept], feats.skipped)


def labelled_images(backbone: Backbone, data: LabelledImages, options: ExtractOptions
                    ) -> LabelledFeatures:
    """The images of *data* that decode, for heads that train on pixels instead of features."""
    kept, skipped = readable_images(data.paths, backbone.preprocess, options.device, options.batch_size,
                                    options.workers, options.strict, options.progress)
    return LabelledFeatures([data.paths[i] for i in kept], data.labels[kept], skipped)


def repurpose(data: str | Path, backbone: BackboneOptions | None = None, head: str = "lr",
              output: str | Path | None = None, head_params: dict | None = None,
              val_split: float = 0.2, seed: int = 0, force: bool = False,
              options: ExtractOptions | None = None, splits: Splits | None = None) -> RepurposeResult:
    """Extract features of *data* once, fit *head* on them, and save the model to *output*.

    ``splits`` replaces the split of *data* (compare and tune hold out their own).
    """
    backbone, options = backbone or BackboneOptions(), options or ExtractOptions()
    if output is not None and Path(output).exists() and not force:
        raise XferkitError(f"{output} already exists. Pass --force to overwrite it, "
                           "or choose another output folder with -o.")
    model_head = create_head(head, **_with_seed(head, head_params or {}, seed))
    splits = splits or load_splits(data, val_split, seed)
    start = time.perf_counter()
    net = _create_backbone(model_head, backbone)
    inputs = labelled_images if model_head.input_kind == "images" else labelled_features
    train = inputs(net, splits.train, options)
    val = inputs(net, splits.val, options) if splits.val else None
    _check_every_class_left(train.y, splits.train.classes)
    if model_head.input_kind == "images":
        model_head.attach(net, options.device, options.batch_size, options.workers, options.progress)
    extracted = time.perf_counter()
    model_head.fit(train.X, train.y, *((val.X, val.y) if val and len(val.y) else ()))
    fitted = time.perf_counter()
    metrics = {}
    if val is not None and len(val.y):
        metrics = classification_metrics(val.y, model_head.predict_proba(val.X))
    info = {"data": str(Path(data).resolve()), "n_train": int(len(train.y)),
            "n_val": int(len(val.y)) if val else 0, "seed": seed, "val_split": val_split,
            "fit_seconds": round(fitted - extracted, 3)}
    model = TransferModel(net, model_head, splits.train.classes, metrics, info)
    if output is not None:
        model.save(output, force=force)
    return RepurposeResult(model, train.skipped + (val.skipped if val else []), splits.notes,
                           {"extract": extracted - start, "fit": fitted - extracted})


def _create_backbone(head: Head, backbone: BackboneOptions) -> Backbone:
    """The backbone; a head that never uses pretrained weights gets a random one (nothing to load)."""
    if getattr(head, "pretrained_weights", True):
        return backbone.create()
    net = replace(backbone, weights=None, pretrained=False).create()
    net.weights_source = f"none: the {head.name} head trains from random initialisation"
    return net


def _with_seed(head: str, params: dict, seed: int) -> dict:
    """Pass the run's seed to heads that take one (those with random initialisation)."""
    takes_seed = "seed" in get_head_class(head)._get_param_names()
    return {**params, "seed": seed} if takes_seed and params.get("seed") is None else params


def _check_every_class_left(y: np.ndarray, classes: list[str]) -> None:
    empty = [name for i, name in enumerate(classes) if not np.any(y == i)]
    if empty:
        raise XferkitError(f"no readable training images left for class(es) {', '.join(empty)}: "
                           "every file there failed to decode. Add valid images or remove them.")


@dataclass
class Evaluation:
    metrics: dict[str, float]
    per_class: list[dict]
    confusion: np.ndarray
    classes: list[str]
    y_true: np.ndarray
    proba: np.ndarray
    skipped: list[tuple[Path, str]]

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "per_class": self.per_class, "classes": self.classes,
                "confusion_matrix": self.confusion.tolist(), "skipped": _skipped_json(self.skipped)}


def load_model(model: str | Path | TransferModel) -> TransferModel:
    return model if isinstance(model, TransferModel) else TransferModel.load(model)


def evaluate(model: str | Path | TransferModel, data: str | Path,
             options: ExtractOptions | None = None) -> Evaluation:
    """Score *model* on a labelled folder (or CSV) whose classes the model knows."""
    model, options = load_model(model), options or ExtractOptions()
    test = read_image_folder(data, min_classes=1).relabel(model.classes)
    proba, feats = model.predict_proba(test.paths, **asdict(options))
    if not len(feats.kept):
        raise XferkitError(f"none of the {len(test)} files in {data} could be read as images.")
    y_true = test.labels[feats.kept]
    y_pred = proba.argmax(axis=1)
    return Evaluation(classification_metrics(y_true, proba),
                      per_class_report(y_true, y_pred, model.classes),
                      confusion(y_true, y_pred, len(model.classes)), model.classes, y_true, proba,
                      feats.skipped)


@dataclass
class Prediction:
    path: Path
    label: str
    probability: float
    top_k: list[tuple[str, float]]
    uncertainty: dict[str, float]

    def to_json(self) -> dict:
        return {"path": str(self.path), "label": self.label, "probability": self.probability,
                "top_k": [{"label": c, "probability": p} for c, p in self.top_k],
                "uncertainty": self.uncertainty}


def predict(model: str | Path | TransferModel, inputs: list[str | Path], top_k: int = 3,
            options: ExtractOptions | None = None) -> tuple[list[Prediction], list]:
    """Label each image (files or folders of files); unreadable ones are returned as skipped."""
    model, options = load_model(model), options or ExtractOptions()
    paths = expand_image_paths(inputs)
    proba, feats = model.predict_proba(paths, **asdict(options))
    if not len(feats.kept):
        return [], feats.skipped
    # image heads predict from pixels; feats.features are not their input, entropy is added below
    uncertainty = model.head.uncertainty(feats.features) if model.head.input_kind == "features" else {}
    uncertainty.setdefault("entropy", predictive_entropy(proba))
    order = np.argsort(-proba, axis=1)[:, :top_k]
    rows = []
    for row, i in enumerate(feats.kept):
        best = [(model.classes[c], float(proba[row, c])) for c in order[row]]
        rows.append(Prediction(paths[i], best[0][0], best[0][1], best,
                               {k: float(v[row]) for k, v in uncertainty.items()}))
    return rows, feats.skipped


def extract(data: str | Path, output: str | Path, backbone: BackboneOptions | None = None,
            options: ExtractOptions | None = None) -> tuple[Features, LabelledImages]:
    """Save features, labels and paths of a labelled folder to one safetensors file."""
    backbone, options = backbone or BackboneOptions(), options or ExtractOptions()
    images = read_image_folder(data)
    net = backbone.create()
    feats = extract_features(net, images.paths, **asdict(options))
    metadata = {"backbone": json.dumps(net.spec()), "classes": json.dumps(images.classes),
                "paths": json.dumps([str(images.paths[i]) for i in feats.kept])}
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.features, "labels": images.labels[feats.kept]}, tmp, metadata)
    tmp.replace(output)
    return feats, images


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(Path(path), json.dumps(data, indent=2).encode())


def _skipped_json(skipped: list[tuple[Path, str]]) -> list[dict]:
    return [{"path": str(p), "reason": reason} for p, reason in skipped]
