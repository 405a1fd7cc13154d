"""Every head on one split of the data: accuracy, calibration and cost side by side, with plots.

All heads share one seeded split (or the data's own train/val/test); feature heads share the
features through the cache, image heads train on pixels. Each head's model is saved in the
output folder, so the winner can be used with ``xferkit predict`` directly. A head that fails
is reported with its reason and the others still run. The test set goes through the backbone
once: a feature head's prediction time is its own, on those features, and the backbone's cost
per image is stated once beside them (without a cache, a temporary one serves this run).
Under torchrun every rank runs the same comparison (extraction sharded, pixel heads trained with
DDP, feature heads fitted on all the features in every rank, as ``repurpose`` does); rank 0 alone
writes the report, plots, test list and model folders.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from xferkit.api.evaluation import Evaluation, evaluate
from xferkit.api.fitting import RepurposeResult, repurpose
from xferkit.api.results import write_json
from xferkit.backbones import create_backbone
from xferkit.core.distributed import DistributedError, is_main, raise_together, world_size
from xferkit.core.errors import XferkitError
from xferkit.core.reporting import SILENT, Reporter
from xferkit.features import Features, extract_features
from xferkit.io.data import LabelledImages, Splits, load_splits, stratified_split
from xferkit.io.files import MODEL_MARKER, atomic_write_bytes, check_output_folder
from xferkit.model.models import load_model
from xferkit.model.options import BackboneOptions, ExtractOptions, SplitOptions
from xferkit.model.registry import head_kind, head_names, head_params

#: The file that marks a folder as a comparison xferkit wrote.
REPORT = "report.json"
#: Table columns: report key -> True where higher is better, False where lower, None: not ranked
#: (a conformal set's coverage should be near its target, and its size means little apart from it).
COLUMNS = {"accuracy": True, "macro_f1": True, "nll": False, "ece": False, "brier": False,
           "coverage": None, "mean_set_size": None,
           "fit_seconds": False, "predict_ms_per_image": False, "size_mb": False}
#: The level of the conformal prediction sets whose coverage and mean size the table reports.
COVERAGE = 0.9
#: Training examples per class for the learning curve (plus "all").
CURVE_SIZES = (1, 2, 5, 10, 20)
#: The learning curve sets transfer (lr on pretrained features) against training from scratch.
CURVE_HEADS = ("lr", "scratch")
#: Test images whose extraction is timed (cache off) to state the backbone's cost per image.
BACKBONE_SAMPLE = 64


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
    #: Decode + backbone per test image (cache off), which a feature head's prediction time leaves out.
    backbone_ms_per_image: float | None = None

    def best(self) -> dict[str, str]:
        """The head with the best value of each column (among the heads that ran)."""
        ok = [r for r in self.rows if r.status == "ok"]
        if not ok:
            return {}
        pick = {True: max, False: min}
        return {col: pick[higher](ok, key=lambda r, c=col: r.metrics[c]).head
                for col, higher in COLUMNS.items() if higher is not None}

    def to_json(self) -> dict:
        return {"split": self.sizes, "test_source": self.test_source, "notes": self.notes,
                "backbone_ms_per_image": self.backbone_ms_per_image, "columns": list(COLUMNS),
                "best": self.best(),
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
    main = is_main()  # under torchrun rank 0 writes; the others keep their test list in a temporary folder
    with tempfile.TemporaryDirectory(prefix="xferkit-compare-") as tmp:

        def prepare() -> tuple[Splits, Path]:
            if main:
                check_output_folder(output, force, marker=REPORT, own=None)  # its files are replaced singly
                for name in heads:
                    check_output_folder(output / name, force=True)  # only an older model of the head goes
            return held_out_splits(data, val_split, test_split, seed, output if main else Path(tmp))

        splits, test_source = raise_together(prepare)
        for note in splits.notes:
            reporter.note(note)
        if options.cache is False:  # the heads still share the features, for this run only
            options = replace(options, cache=Path(tmp) / "cache")
        result = _compare_heads(data, backbone, heads, common_params or {}, head_params or {}, splits,
                                test_source, val_split, seed, learning_curve, calibrate, output, options,
                                reporter)
    if main:
        result.plots = write_plots(result, output)
        write_json(output / REPORT, result.to_json())
    return result


def _compare_heads(data, backbone: BackboneOptions, heads: list[str], common_params: dict, head_params: dict,
                   splits: Splits, test_source: Path, val_split: float, seed: int, learning_curve: bool,
                   calibrate: bool, output: Path, options: ExtractOptions, reporter: Reporter) -> Comparison:
    """:func:`compare` once the output and the splits are settled, with a feature cache in *options*."""

    def fit(name: str, fit_splits: Splits, folder: Path | None) -> RepurposeResult:
        return repurpose(data, backbone=backbone, head=name,
                         params=params_for(name, common_params, head_params.get(name, {})),
                         output=folder, val_split=val_split, seed=seed, calibrate=calibrate, force=True,
                         options=options, splits=fit_splits, reporter=reporter)

    test_features, backbone_ms = None, None
    if any(head_kind(name) == "features" for name in heads):
        test_features, backbone_ms = held_out_features(backbone, splits.test.paths, options, reporter)
    rows = [run_head(name, lambda f, n=name: fit(n, splits, f), test_source, output / name, options, reporter,
                     test_features) for name in heads]
    notes = [*splits.notes, *([f"the backbone takes {backbone_ms:.3g} ms per test image (decode and forward "
                               "pass); the feature heads' ms/img time the head alone, on its features"]
                              if backbone_ms is not None else []),
             *([f"{world_size()} torchrun processes: the backbone's ms per image and the pixel heads' fit "
                "and prediction times are wall time of all of them together; each fits and times a "
                "feature head on all the features, so those times are one process's"]
               if world_size() > 1 else [])]
    result = Comparison(rows, {"train": len(splits.train), "val": len(splits.val or []),
                               "test": len(splits.test)}, str(test_source), notes,
                        backbone_ms_per_image=backbone_ms)
    if learning_curve:
        done = {r.head: r.metrics["accuracy"] for r in rows if r.status == "ok"}
        for name in (h for h in CURVE_HEADS if h in head_names()):

            def test_accuracy(fit_splits: Splits, name=name) -> float:
                model = fit(name, fit_splits, None).model
                return evaluate(model, test_source, options=options, reporter=reporter).metrics["accuracy"]

            try:
                result.curves[name] = curve_points(splits, seed, test_accuracy, done.get(name))
            except DistributedError:
                raise  # a lost rank ends the comparison on every rank
            except Exception as err:  # a failed curve must not lose the table
                result.notes.append(f"learning curve of {name} failed: {type(err).__name__}: {err}")
    return result


def held_out_features(backbone: BackboneOptions, paths: list[Path], options: ExtractOptions,
                      reporter: Reporter) -> tuple[Features, float]:
    """The test features (into the cache, which every head's evaluation then reads) and the backbone's
    cost per image, timed once on up to ``BACKBONE_SAMPLE`` of them with the cache off."""
    net = create_backbone(backbone.name, backbone.weights, backbone.pretrained, backbone.layer,
                          backbone.image_size)
    run = {"device": options.device, "batch_size": options.batch_size, "workers": options.workers,
           "reporter": reporter}
    features = extract_features(net, paths, cache=options.cache, **run)  # also warms files and kernels
    sample = paths[:BACKBONE_SAMPLE]
    start = time.perf_counter()
    extract_features(net, sample, cache=False, **run)
    return features, round(1000 * (time.perf_counter() - start) / max(1, len(sample)), 3)


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
             reporter: Reporter = SILENT, test_features: Features | None = None) -> HeadResult:
    """Fit (``fit(folder)`` saves the model there), then score on the test set; failures become rows.

    Prediction sets at ``COVERAGE`` are scored where the model holds out enough images for them.

    A feature head's prediction is timed on *test_features* (the head alone; the backbone's cost
    is the comparison's own); a pixel head's on the test images, end to end. Under torchrun every
    rank fits and scores; rank 0 alone saves, and a failed save fails the head on every rank.
    """
    main = is_main()
    if main and (folder / MODEL_MARKER).is_file():
        shutil.rmtree(folder)  # an older model of this head must not outlive a failed fit

    def fit_and_load():
        fitted = fit(folder if main else None)
        return fitted, load_model(folder) if main else fitted.model  # rank 0: what `xferkit predict` loads

    try:
        fitted, model = raise_together(fit_and_load)
        start = time.perf_counter()
        sets = COVERAGE if _can_cover(model, COVERAGE) else None
        scored = evaluate(model, test_source, options=options, coverage=sets, reporter=reporter)
        seconds, n = time.perf_counter() - start, scored.metrics["n"]
        if model.kind == "features" and test_features is not None and len(test_features.kept):
            seconds, n = head_seconds(model.estimator, test_features.features), len(test_features.kept)
    except DistributedError:
        raise  # a lost rank ends the comparison on every rank
    except Exception as err:  # out of memory or a bug in one head must not end the others
        return HeadResult(name, "failed", error=f"{type(err).__name__}: {err}",
                          details=traceback.format_exc(limit=-3))
    metrics = {"accuracy": scored.metrics["accuracy"], "macro_f1": scored.metrics["macro_f1"],
               "nll": scored.metrics["nll"], "ece": scored.metrics["ece"],
               "brier": scored.metrics["brier"], "coverage": scored.metrics.get("coverage"),
               "mean_set_size": scored.metrics.get("mean_set_size"),
               "fit_seconds": fitted.model.info["fit_seconds"],
               "predict_ms_per_image": round(1000 * seconds / max(1, n), 3),
               "size_mb": round(folder_bytes(folder) / 1e6, 3), "n_test": scored.metrics["n"],
               "val_nll": fitted.model.metrics.get("nll"),
               "val_accuracy": fitted.model.metrics.get("accuracy")}
    return HeadResult(name, "ok", metrics, str(folder), evaluation=scored)


def _can_cover(model, coverage: float) -> bool:
    """Whether *model* records enough held-out images for prediction sets at *coverage*."""
    held_out = model.held_out
    try:
        return held_out is not None and held_out.set_threshold(coverage) is not None
    except XferkitError:
        return False


def head_seconds(head, features) -> float:
    """Seconds a feature head takes to predict (probabilities and its uncertainties) on *features*."""
    start = time.perf_counter()
    head.predict_proba(features)
    head.uncertainty(features)
    return time.perf_counter() - start


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
