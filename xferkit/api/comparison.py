"""Every head on one split of the data: accuracy, calibration and cost side by side, with plots.

All heads share one seeded split (or the data's own train/val/test); feature heads share the
features through the cache, image heads train on pixels. Each head's model is saved in the
output folder, so the winner can be used with ``xferkit predict`` directly. A head that fails
is reported with its reason and the others still run.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from xferkit.api.evaluation import Evaluation, evaluate
from xferkit.api.fitting import RepurposeResult, repurpose
from xferkit.api.results import write_json
from xferkit.backbones import create_backbone
from xferkit.core.errors import XferkitError
from xferkit.core.reporting import SILENT, Reporter
from xferkit.features import extract_features
from xferkit.io.data import LabelledImages, Splits, load_splits, stratified_split
from xferkit.io.files import MODEL_MARKER, atomic_write_bytes, check_output_folder
from xferkit.model.models import load_model
from xferkit.model.options import BackboneOptions, ExtractOptions, SplitOptions
from xferkit.model.registry import head_kind, head_names, head_params

#: The file that marks a folder as a comparison xferkit wrote.
REPORT = "report.json"
#: Table columns: report key -> True where higher is better.
COLUMNS = {"accuracy": True, "macro_f1": True, "nll": False, "ece": False, "brier": False,
           "fit_seconds": False, "predict_ms_per_image": False, "size_mb": False}
#: Training examples per class for the learning curve (plus "all").
CURVE_SIZES = (1, 2, 5, 10, 20)
#: The learning curve sets transfer (lr on pretrained features) against training from scratch.
CURVE_HEADS = ("lr", "scratch")


@dataclass
class HeadResult:
    """One row of the comparison: test metrics and costs, or why the head failed."""

    head: str
    status: str
    metrics: dict = field(default_factory=dict)
    artifact: str | None = None
    error: str | None = None
    details: str | None = None
    evaluation: Evaluation | None = None

    def to_json(self) -> dict:
        return {"head": self.head, "status": self.status, **self.metrics, "artifact": self.artifact,
                "error": self.error, "traceback": self.details}


@dataclass
class Comparison:
    rows: list[HeadResult]
    sizes: dict[str, int]
    test_source: str
    notes: list[str]
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)

    def best(self) -> dict[str, str]:
        """The head with the best value of each column (among the heads that ran)."""
        ok = [r for r in self.rows if r.status == "ok"]
        if not ok:
            return {}
        pick = {True: max, False: min}
        return {col: pick[higher](ok, key=lambda r, c=col: r.metrics[c]).head
                for col, higher in COLUMNS.items()}

    def to_json(self) -> dict:
        return {"split": self.sizes, "test_source": self.test_source, "notes": self.notes,
                "columns": list(COLUMNS), "best": self.best(),
                "heads": [r.to_json() for r in self.rows],
                "learning_curve": {h: [list(p) for p in pts] for h, pts in self.curves.items()},
                "plots": self.plots}


def compare(data: str | Path, *, backbone: BackboneOptions | str = BackboneOptions(),
            heads: list[str] | None = None, output: str | Path = "runs/compare",
            common_params: dict | None = None, head_params: dict[str, dict] | None = None,
            val_split: float = SplitOptions.val_split, test_split: float = SplitOptions.test_split,
            seed: int = SplitOptions.seed, learning_curve: bool = False, calibrate: bool = True,
            force: bool = False, options: ExtractOptions = ExtractOptions(),
            reporter: Reporter = SILENT) -> Comparison:
    """Fit each head on the same split of *data*, score it on the test split, save it, plot.

    ``common_params`` go to every head that takes them (e.g. ``epochs``); ``head_params`` maps
    a head name to options for that head only.
    """
    backbone = BackboneOptions(backbone) if isinstance(backbone, str) else backbone
    output = Path(output)
    heads = list(heads or head_names())
    unknown = sorted({*heads, *(head_params or {})} - set(head_names()))
    if unknown:  # before any work is done; a head that is known but breaks fails in its own row
        raise XferkitError(f"unknown head(s) {', '.join(unknown)}; choose from {', '.join(head_names())}.")
    check_output_folder(output, force, marker=REPORT, own=None)  # its files are overwritten one by one
    for name in heads:
        check_output_folder(output / name, force=True)  # only an older model of this head is replaced
    splits, test_source = held_out_splits(data, val_split, test_split, seed, output)
    for note in splits.notes:
        reporter.note(note)

    def fit(name: str, fit_splits: Splits, folder: Path | None) -> RepurposeResult:
        return repurpose(data, backbone=backbone, head=name,
                         params=params_for(name, common_params or {}, (head_params or {}).get(name, {})),
                         output=folder, val_split=val_split, seed=seed, calibrate=calibrate, force=True,
                         options=options, splits=fit_splits, reporter=reporter)

    if any(head_kind(name) == "features" for name in heads):
        # one pass over the test images first warms the file cache and the kernels, so that each head's
        # timed prediction measures the head, not who came first (the learning curve reuses the features)
        net = create_backbone(backbone.name, backbone.weights, backbone.pretrained, backbone.layer,
                              backbone.image_size)
        extract_features(net, splits.test.paths, device=options.device, batch_size=options.batch_size,
                         workers=options.workers, cache=options.cache, reporter=reporter)
    rows = [run_head(name, lambda f, n=name: fit(n, splits, f), test_source, output / name, options, reporter)
            for name in heads]
    result = Comparison(rows, {"train": len(splits.train), "val": len(splits.val or []),
                               "test": len(splits.test)}, str(test_source), splits.notes)
    if learning_curve:
        done = {r.head: r.metrics["accuracy"] for r in rows if r.status == "ok"}
        for name in (h for h in CURVE_HEADS if h in head_names()):

            def test_accuracy(fit_splits: Splits, name=name) -> float:
                model = fit(name, fit_splits, None).model
                return evaluate(model, test_source, options=options, reporter=reporter).metrics["accuracy"]

            try:
                result.curves[name] = curve_points(splits, seed, test_accuracy, done.get(name))
            except Exception as err:  # a failed curve must not lose the table
                result.notes.append(f"learning curve of {name} failed: {type(err).__name__}: {err}")
    result.plots = write_plots(result, output)
    write_json(output / REPORT, result.to_json())
    return result


def params_for(name: str, common: dict, own: dict) -> dict:
    """The common options this head takes, overridden by its own."""
    accepted = head_params(name)
    return {**{k: v for k, v in common.items() if k in accepted and v is not None}, **own}


def held_out_splits(data: str | Path, val_split: float, test_split: float, seed: int, output: Path
                    ) -> tuple[Splits, Path]:
    """The data's own splits; without a test/ folder, a stratified seeded test set is held out.

    Returns the splits and where the test set lives (``DATA/test``, or ``test.csv`` in *output*).
    """
    splits = load_splits(data, val_split, seed)
    if splits.test is not None:
        return splits, Path(data) / "test"
    if not 0.0 < test_split < 1.0:
        raise XferkitError(f"{data} has no test/ folder, so compare holds one out: --test-split "
                           f"must be in (0, 1), got {test_split}.")
    train, test = stratified_split(splits.train, test_split, seed)
    source = output / "test.csv"
    atomic_write_bytes(source, labelled_csv(test).encode())
    note = (f"test: {len(test)} images held out from the training data (stratified, seed {seed}; "
            f"listed in {source}), since {data} has no test/ folder")
    return Splits(train, splits.val, test, [*splits.notes, note]), source


def labelled_csv(images: LabelledImages) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label"])
    writer.writerows((p.resolve(), images.classes[y]) for p, y in zip(images.paths, images.labels,
                                                                       strict=True))
    return buffer.getvalue()


def run_head(name: str, fit, test_source: Path, folder: Path, options: ExtractOptions,
             reporter: Reporter = SILENT) -> HeadResult:
    """Fit (``fit(folder)`` saves the model there), then score on the test set; failures become rows."""
    if (folder / MODEL_MARKER).is_file():
        shutil.rmtree(folder)  # an older model of this head must not outlive a failed fit
    try:
        fitted = fit(folder)
        model = load_model(folder)  # what `xferkit predict` would load
        start = time.perf_counter()
        scored = evaluate(model, test_source, options=replace(options, cache=False),
                          reporter=reporter)  # end-to-end timing
        seconds = time.perf_counter() - start
    except Exception as err:  # out of memory or a bug in one head must not end the others
        return HeadResult(name, "failed", error=f"{type(err).__name__}: {err}",
                          details=traceback.format_exc(limit=-3))
    metrics = {"accuracy": scored.metrics["accuracy"], "macro_f1": scored.metrics["macro_f1"],
               "nll": scored.metrics["nll"], "ece": scored.metrics["ece"],
               "brier": scored.metrics["brier"], "fit_seconds": fitted.model.info["fit_seconds"],
               "predict_ms_per_image": round(1000 * seconds / max(1, scored.metrics["n"]), 3),
               "size_mb": round(folder_bytes(folder) / 1e6, 3), "n_test": scored.metrics["n"],
               "val_nll": fitted.model.metrics.get("nll"),
               "val_accuracy": fitted.model.metrics.get("accuracy")}
    return HeadResult(name, "ok", metrics, str(folder), evaluation=scored)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def curve_points(splits: Splits, seed: int, accuracy_of, full_accuracy: float | None = None
                 ) -> list[tuple[float, float]]:
    """(examples per class, test accuracy) for nested per-class subsets of the training split.

    ``accuracy_of(splits)`` fits on the given splits and returns test accuracy; the point for
    the whole training split reuses *full_accuracy* when the main comparison already has it.
    """
    counts = np.bincount(splits.train.labels, minlength=len(splits.train.classes))
    points = [(k, accuracy_of(replace(splits, train=per_class_subset(splits.train, k, seed))))
              for k in CURVE_SIZES if k < counts.max()]
    full = full_accuracy if full_accuracy is not None else accuracy_of(splits)
    return [*points, (round(float(counts.mean()), 1), full)]


def per_class_subset(data: LabelledImages, k: int, seed: int) -> LabelledImages:
    """The first *k* images of each class in a seeded order (so smaller subsets nest in larger)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(data.labels == c))[:k] for c in range(len(data.classes))]
    return data.subset(np.sort(np.concatenate(keep)))


def write_plots(result: Comparison, output: Path) -> list[str]:
    """Reliability diagrams of all heads, accuracy against fit time, and the learning curve."""
    from xferkit.api.plots import plot_accuracy_vs_time, plot_learning_curve, plot_reliability

    ok = [r for r in result.rows if r.status == "ok"]
    if not ok:
        return []
    plots = [plot_reliability({r.head: (r.evaluation.y_true, r.evaluation.proba) for r in ok},
                              output / "reliability.png"),
             plot_accuracy_vs_time({r.head: (r.metrics["fit_seconds"], r.metrics["accuracy"])
                                    for r in ok}, output / "accuracy_vs_fit_time.png")]
    if result.curves:
        plots.append(plot_learning_curve(result.curves, output / "learning_curve.png"))
    return [str(p) for p in plots]
