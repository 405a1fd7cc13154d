"""``evaluate`` a model on labelled images, and ``predict`` labels for new ones."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xferkit.api.results import skipped_json
from xferkit.core.conformal import prediction_sets
from xferkit.core.distributed import is_main
from xferkit.core.errors import XferkitError
from xferkit.core.metrics import classification_metrics, confusion, per_class_report
from xferkit.core.ood import auroc
from xferkit.core.reporting import SILENT, Reporter
from xferkit.io.data import expand_image_paths, read_image_folder
from xferkit.io.files import atomic_write_bytes, check_output_file
from xferkit.model.held_out import DEFAULT_OOD_RATE, HeldOut, require_held_out
from xferkit.model.models import Predictions, TransferModel, load_model
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


def held_out_of(model: TransferModel, asked: str) -> HeldOut:
    """The model's held-out record, needed for what the user *asked*; a model without one is refused."""
    return require_held_out(model.held_out, asked)


def evaluate(model: str | Path | TransferModel, data: str | Path | None = None, *,
             options: ExtractOptions = ExtractOptions(), plots: str | Path | None = None,
             coverage: float | None = None, ood: str | Path | None = None, ood_rate: float = DEFAULT_OOD_RATE,
             reporter: Reporter = SILENT) -> Evaluation:
    """Score *model* on labelled *data* (default: its training data's ``test/``); PNGs go to ``plots``.

    ``coverage`` adds the empirical coverage and mean size of conformal prediction sets at that
    level; ``ood`` (a folder of images of another kind) adds the AUROC of the OOD score between
    *data* and it, and the rates flagged at the ``ood_rate`` false-alarm threshold.
    """
    if plots is not None and Path(plots).exists() and not Path(plots).is_dir():
        raise XferkitError(f"--plots {plots} is a file; give the folder to write the plots into.")
    model = loaded(model)
    if coverage is not None:
        held_out_of(model, "--coverage").set_threshold(coverage)  # refused before any work
    if ood is not None:
        held_out_of(model, "--ood").threshold(ood_rate)
        outside_paths = expand_image_paths([ood])
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
    if coverage is not None:
        sets = model.held_out.sets(predictions.proba, coverage)
        covered = sets[np.arange(len(y_true)), y_true]
        result.metrics.update(target_coverage=coverage, coverage=float(covered.mean()),
                              mean_set_size=float(sets.sum(axis=1).mean()))
    if ood is not None:
        outside = model.predict(outside_paths, options, reporter)
        if not len(outside.kept):
            raise XferkitError(f"none of the {len(outside_paths)} files in --ood {ood} could be read as "
                               "images.")
        result.metrics.update(_ood_metrics(model.held_out, predictions, outside, ood_rate))
        result.skipped += outside.skipped
    if plots is not None and is_main():  # under torchrun rank 0 writes
        from xferkit.api.plots import plot_confusion, plot_reliability

        folder = Path(plots)
        curves = {model.head: (y_true, predictions.proba)}
        result.plots = [str(plot_confusion(result.confusion, model.classes, folder / "confusion_matrix.png")),
                        str(plot_reliability(curves, folder / "reliability.png"))]
    return result


def _ood_metrics(held_out: HeldOut, inside: Predictions, outside: Predictions, rate: float) -> dict:
    """AUROC of the OOD score (test images against others), and who is flagged at the *rate* threshold."""
    threshold, score = held_out.threshold(rate), held_out.ood_score
    inside_scores, outside_scores = inside.uncertainty[score], outside.uncertainty[score]
    return {"ood_auroc": auroc(inside_scores, outside_scores), "ood_rate": rate,
            "ood_false_alarm_rate": float((inside_scores > threshold).mean()),
            "ood_detection_rate": float((outside_scores > threshold).mean())}


@dataclass
class Prediction:
    """One image's label, its probability, the top-k labels and the uncertainties.

    ``prediction_set`` (when a coverage was asked) and ``ood`` (when the model records held-out
    scores) are None otherwise, and then left out of the JSON and the CSV.
    """

    path: Path
    label: str
    probability: float
    top_k: list[tuple[str, float]]
    uncertainty: dict[str, float]
    prediction_set: list[str] | None = None
    ood: bool | None = None

    def to_json(self) -> dict:
        return {"path": str(self.path), "label": self.label, "probability": self.probability,
                "top_k": [{"label": c, "probability": p} for c, p in self.top_k],
                **({"prediction_set": self.prediction_set} if self.prediction_set is not None else {}),
                **({"ood": self.ood} if self.ood is not None else {}),
                "uncertainty": self.uncertainty}


@dataclass
class PredictionResult:
    """Predictions for the images that decoded, and the files skipped."""

    predictions: list[Prediction]
    skipped: list[tuple[Path, str]]

    def to_json(self) -> dict:
        return {"predictions": [p.to_json() for p in self.predictions], "skipped": skipped_json(self.skipped)}

    def to_csv(self) -> str:
        """``path,label,probability,top_k[,prediction_set][,ood],<uncertainties>``.

        Top-k as ``label:p;label:p``, the prediction set as ``label;label``, ood as true or false.
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        first = self.predictions[0] if self.predictions else Prediction(Path(), "", 0.0, [], {})
        keys, optional = list(first.uncertainty), [k for k in ("prediction_set", "ood")
                                                    if getattr(first, k) is not None]
        writer.writerow([*CSV_HEADER.decode().split(","), *optional, *keys])
        for p in self.predictions:
            extra = {"prediction_set": ";".join(p.prediction_set or []), "ood": str(p.ood).lower()}
            writer.writerow([p.path, p.label, f"{p.probability:.6f}",
                             ";".join(f"{c}:{q:.6f}" for c, q in p.top_k), *(extra[k] for k in optional),
                             *(f"{p.uncertainty[k]:.6f}" for k in keys)])
        return buffer.getvalue()

    def write_csv(self, path: str | Path) -> Path:
        """Write :meth:`to_csv` to *path*; an existing file is replaced only if it is such a CSV."""
        check_output_file(Path(path), True, is_predictions_csv, "a predictions CSV")
        atomic_write_bytes(Path(path), self.to_csv().encode())
        return Path(path)


def _flag_threshold(model: TransferModel, rate: float | None, reporter: Reporter) -> float | None:
    """The OOD score threshold at false-alarm *rate*; without one asked, the default rate where possible."""
    held_out = model.held_out
    if rate is not None:
        return held_out_of(model, "--ood-rate").threshold(rate)
    if held_out is None:
        return None
    try:
        return held_out.threshold(DEFAULT_OOD_RATE)
    except XferkitError as err:
        reporter.warn(f"no OOD flags: {err}")
        return None


def is_predictions_csv(path: Path) -> bool:
    """Whether *path* starts like a CSV that ``predict`` wrote."""
    try:
        with open(path, "rb") as f:
            return f.read(len(CSV_HEADER)) == CSV_HEADER
    except OSError:
        return False


def predict(model: str | Path | TransferModel, inputs: list[str | Path], *, top_k: int = 3,
            csv: str | Path | None = None, coverage: float | None = None, ood_rate: float | None = None,
            options: ExtractOptions = ExtractOptions(), reporter: Reporter = SILENT) -> PredictionResult:
    """Label each image (files, or folders of files); unreadable ones are listed as skipped.

    ``coverage`` adds each image's conformal prediction set at that level. Images are flagged
    ``ood`` at the ``ood_rate`` false-alarm rate (default 5 %, where the model's held-out set is
    large enough for it). ``csv`` also writes the predictions there (checked before any work: an
    existing file is replaced only if it is a predictions CSV).
    """
    if csv is not None:
        check_output_file(Path(csv), True, is_predictions_csv, "a predictions CSV")
    model = loaded(model)
    set_threshold = held_out_of(model, "--coverage").set_threshold(coverage) if coverage is not None else None
    flag_threshold = _flag_threshold(model, ood_rate, reporter)
    paths = expand_image_paths(inputs)
    out = model.predict(paths, options, reporter)
    ranking = np.argsort(-out.proba, axis=1)  # most probable first
    sets = prediction_sets(out.proba, set_threshold) if set_threshold is not None else None
    flags = out.uncertainty[model.held_out.ood_score] > flag_threshold if flag_threshold is not None else None
    rows = []
    for row, i in enumerate(out.kept):
        best = [(model.classes[c], float(out.proba[row, c])) for c in ranking[row, :top_k]]
        chosen = [model.classes[c] for c in ranking[row] if sets[row, c]] if sets is not None else None
        rows.append(Prediction(paths[i], best[0][0], best[0][1], best,
                               {k: float(v[row]) for k, v in out.uncertainty.items()}, chosen,
                               bool(flags[row]) if flags is not None else None))
    result = PredictionResult(rows, out.skipped)
    if csv is not None and is_main():
        result.write_csv(csv)
    return result
