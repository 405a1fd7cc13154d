"""``evaluate`` a model on labelled images, and ``predict`` labels for new ones."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xferkit.api.results import skipped_json
from xferkit.core.errors import XferkitError
from xferkit.core.metrics import classification_metrics, confusion, per_class_report
from xferkit.core.reporting import SILENT, Reporter
from xferkit.io.data import expand_image_paths, read_image_folder
from xferkit.io.files import atomic_write_bytes, check_output_file
from xferkit.model.models import TransferModel, load_model
from xferkit.model.options import ExtractOptions

#: How a predictions CSV begins.
CSV_HEADER = b"path,label,probability,top_k"


def loaded(model: str | Path | TransferModel) -> TransferModel:
    """*model* itself, or the model saved in that folder."""
    return model if isinstance(model, TransferModel) else load_model(model)


@dataclass
class Evaluation:
    """Test metrics, per-class report and confusion matrix of a model on labelled images."""

    data: Path
    metrics: dict[str, float]
    per_class: list[dict]
    confusion: np.ndarray
    classes: list[str]
    y_true: np.ndarray
    proba: np.ndarray
    skipped: list[tuple[Path, str]]
    plots: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"data": str(self.data), "metrics": self.metrics, "per_class": self.per_class,
                "classes": self.classes, "confusion_matrix": self.confusion.tolist(),
                "skipped": skipped_json(self.skipped), **({"plots": self.plots} if self.plots else {})}


def default_test_data(model: TransferModel) -> Path:
    """The ``test/`` folder of the data the model was trained on, when it has one."""
    folder = Path(model.info.get("data", "")) / "test"
    if not folder.is_dir():
        raise XferkitError(f"no test data given and {folder} does not exist; "
                           "pass the labelled test folder: xferkit evaluate MODEL DATA.")
    return folder


def evaluate(model: str | Path | TransferModel, data: str | Path | None = None, *,
             options: ExtractOptions = ExtractOptions(), plots: str | Path | None = None,
             reporter: Reporter = SILENT) -> Evaluation:
    """Score *model* on labelled *data* (default: its training data's ``test/``); PNGs go to ``plots``."""
    if plots is not None and Path(plots).exists() and not Path(plots).is_dir():
        raise XferkitError(f"--plots {plots} is a file; give the folder to write the plots into.")
    model = loaded(model)
    data = Path(data) if data is not None else default_test_data(model)
    test = read_image_folder(data, min_classes=1).relabel(model.classes)
    predictions = model.predict(test.paths, options, reporter)
    if not len(predictions.kept):
        raise XferkitError(f"none of the {len(test)} files in {data} could be read as images.")
    y_true = test.labels[predictions.kept]
    y_pred = predictions.proba.argmax(axis=1)
    result = Evaluation(data, classification_metrics(y_true, predictions.proba),
                        per_class_report(y_true, y_pred, model.classes),
                        confusion(y_true, y_pred, len(model.classes)), model.classes, y_true,
                        predictions.proba, predictions.skipped)
    if plots is not None:
        from xferkit.api.plots import plot_confusion, plot_reliability

        folder = Path(plots)
        curves = {model.head: (y_true, predictions.proba)}
        result.plots = [str(plot_confusion(result.confusion, model.classes, folder / "confusion_matrix.png")),
                        str(plot_reliability(curves, folder / "reliability.png"))]
    return result


@dataclass
class Prediction:
    """One image's label, its probability, the top-k labels and the uncertainties."""

    path: Path
    label: str
    probability: float
    top_k: list[tuple[str, float]]
    uncertainty: dict[str, float]

    def to_json(self) -> dict:
        return {"path": str(self.path), "label": self.label, "probability": self.probability,
                "top_k": [{"label": c, "probability": p} for c, p in self.top_k],
                "uncertainty": self.uncertainty}


@dataclass
class PredictionResult:
    """Predictions for the images that decoded, and the files skipped."""

    predictions: list[Prediction]
    skipped: list[tuple[Path, str]]

    def to_json(self) -> dict:
        return {"predictions": [p.to_json() for p in self.predictions], "skipped": skipped_json(self.skipped)}

    def to_csv(self) -> str:
        """``path,label,probability,top_k,<uncertainties>``, top-k as ``label:p;label:p``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        keys = list(self.predictions[0].uncertainty) if self.predictions else []
        writer.writerow([*CSV_HEADER.decode().split(","), *keys])
        for p in self.predictions:
            writer.writerow([p.path, p.label, f"{p.probability:.6f}",
                             ";".join(f"{c}:{q:.6f}" for c, q in p.top_k),
                             *(f"{p.uncertainty[k]:.6f}" for k in keys)])
        return buffer.getvalue()

    def write_csv(self, path: str | Path) -> Path:
        """Write :meth:`to_csv` to *path*; an existing file is replaced only if it is such a CSV."""
        check_output_file(Path(path), True, is_predictions_csv, "a predictions CSV")
        atomic_write_bytes(Path(path), self.to_csv().encode())
        return Path(path)


def is_predictions_csv(path: Path) -> bool:
    """Whether *path* starts like a CSV that ``predict`` wrote."""
    try:
        with open(path, "rb") as f:
            return f.read(len(CSV_HEADER)) == CSV_HEADER
    except OSError:
        return False


def predict(model: str | Path | TransferModel, inputs: list[str | Path], *, top_k: int = 3,
            csv: str | Path | None = None, options: ExtractOptions = ExtractOptions(),
            reporter: Reporter = SILENT) -> PredictionResult:
    """Label each image (files, or folders of files); unreadable ones are listed as skipped.

    ``csv`` also writes the predictions there (checked before any work: an existing file is
    replaced only if it is a predictions CSV).
    """
    if csv is not None:
        check_output_file(Path(csv), True, is_predictions_csv, "a predictions CSV")
    model = loaded(model)
    paths = expand_image_paths(inputs)
    out = model.predict(paths, options, reporter)
    order = np.argsort(-out.proba, axis=1)[:, :top_k]
    rows = []
    for row, i in enumerate(out.kept):
        best = [(model.classes[c], float(out.proba[row, c])) for c in order[row]]
        rows.append(Prediction(paths[i], best[0][0], best[0][1], best,
                               {k: float(v[row]) for k, v in out.uncertainty.items()}))
    result = PredictionResult(rows, out.skipped)
    if csv is not None:
        result.write_csv(csv)
    return result
