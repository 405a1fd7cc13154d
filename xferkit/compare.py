"""Every head on one split of the data: accuracy, calibration and cost side by side, with plots.

All heads share one seeded split (or the data's own train/val/test); feature heads share the
features through the cache, image heads train on pixels. Each head's model is saved in the
output folder, so the winner can be used with ``xferkit predict`` directly. A head that fails
is reported with its reason and the others still run.
"""

from __future__ import annotations

import csv
import inspect
import io
import shutil
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from xferkit.artifacts import atomic_write_bytes
from xferkit.data import LabelledImages, Splits, load_splits, stratified_split
from xferkit.errors import XferkitError
from xferkit.heads import get_head_class, head_names
from xferkit.pipeline import (
    BackboneOptions,
    Evaluation,
    ExtractOptions,
    evaluate,
    labelled_features,
    load_model,
    repurpose,
    write_json,
)

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


def compare(data: str | Path, backbone: BackboneOptions | None = None, heads: list[str] | None = None,
            output: str | Path = "runs/compare", common_params: dict | None = None,
            head_params: dict[str, dict] | None = None, val_split: float = 0.2,
            test_split: float = 0.2, seed: int = 0, learning_curve: bool = False, force: bool = False,
            options: ExtractOptions | None = None) -> Comparison:
    """Fit each head on the same split of *data*, score it on the test split, save it, plot.

    ``common_params`` go to every head that takes them (e.g. ``epochs``); ``head_params`` maps
    a head name to options for that head only.
    """
    backbone, options, output = backbone or BackboneOptions(), options or ExtractOptions(), Path(output)
    heads = list(heads or head_names())
    unknown = sorted({*heads, *(head_params or {})} - set(head_names()))
    if unknown:  # before any work is done; a head that is known but breaks fails in its own row
        raise XferkitError(f"unknown head(s) {', '.join(unknown)}; choose from {', '.join(head_names())}.")
    if (output / "report.json").exists() and not force:
        raise XferkitError(f"{output} already holds a comparison. Pass --force to overwrite it, "
                           "or choose another output folder with -o.")
    splits, test_source = held_out_splits(data, val_split, test_split, seed, output)

    def params(name: str) -> dict:
        return params_for(name, common_params or {}, (head_params or {}).get(name, {}))

    def fit(name: str, fit_splits: Splits, folder: Path | None):
        return repurpose(data, backbone, name, folder, params(name), val_split, seed, force=True,
                         options=options, splits=fit_splits)

    # one pass over the test images first warms the file cache and the kernels, so that each head's
    # timed prediction measures the head, not who came first (the learning curve reuses the features)
    labelled_features(backbone.create(), splits.test, options)
    rows = [run_head(name, lambda f, n=name: fit(n, splits, f), test_source, output / name, options)
            for name in heads]
    result = Comparison(rows, {"train": len(splits.train), "val": len(splits.val or []),
                               "test": len(splits.test)}, str(test_source), splits.notes)
    if learning_curve:
        done = {r.head: r.metrics["accuracy"] for r in rows if r.status == "ok"}
        for name in (h for h in CURVE_HEADS if h in head_names()):

            def test_accuracy(fit_splits: Splits, name=name) -> float:
                return evaluate(fit(name, fit_splits, None).model, test_source, options).metrics["accuracy"]

            try:
                result.curves[name] = curve_points(splits, seed, test_accuracy, done.get(name))
            except Exception as err:  # a failed curve must not lose the table
                result.notes.append(f"learning curve of {name} failed: {type(err).__name__}: {err}")
    result.plots = write_plots(result, output)
    write_json(output / "report.json", result.to_json())
    return result


def params_for(name: str, common: dict, own: dict) -> dict:
    """The common options this head takes, overridden by its own."""
    accepted = get_head_class(name)._get_param_names()
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


def run_head(name: str, fit, test_source: Path, folder: Path, options: ExtractOptions) -> HeadResult:
    """Fit (``fit(folder)`` saves the model there), then score on the test set; failures become rows."""
    shutil.rmtree(folder, ignore_errors=True)  # a failed head must not leave an older model behind
    try:
        fitted = fit(folder)
        model = load_model(folder)  # what `xferkit predict` would load
        start = time.perf_counter()
        scored = evaluate(model, test_source, replace(options, cache_dir=False))  # end-to-end timing
        seconds = time.perf_counter() - start
    except Exception as err:  # out of memory or a bug in one head must not end the others
        return HeadResult(name, "failed", error=f"{type(err).__name__}: {err}",
                          details=traceback.format_exc(limit=-3))
    metrics = {"accuracy": scored.metrics["accuracy"], "macro_f1": scored.metrics["macro_f1"],
               "nll": scored.metrics["nll"], "ece": scored.metrics["ece"],
               "brier": scored.metrics["brier"], "fit_seconds": round(fitted.timings["fit"], 3),
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
    from xferkit.plots import plot_accuracy_vs_time, plot_learning_curve, plot_reliability

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


def parse_head_settings(items: list[str]) -> dict[str, dict]:
    """``["finetune.epochs=2", "scratch.arch=resnet10t"]`` as ``{head: {param: value}}``.

    Values take the type of the parameter's default (text where the default is None and the
    value is not a number).
    """
    settings: dict[str, dict] = {}
    for item in items:
        key, sep, text = item.partition("=")
        head, dot, param = key.strip().partition(".")
        if not (sep and dot and head and param):
            raise XferkitError(f"--set takes HEAD.PARAM=VALUE (e.g. finetune.epochs=2), got {item!r}.")
        accepted = get_head_class(head)._get_param_names()
        if param not in accepted:
            raise XferkitError(f"the {head} head has no parameter {param!r}; it takes: "
                               f"{', '.join(accepted)}.")
        default = inspect.signature(get_head_class(head).__init__).parameters[param].default
        settings.setdefault(head, {})[param] = _typed(text.strip(), default)
    return settings


def _typed(text: str, default):
    if text.lower() == "none":
        return None
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if default is not None:
        try:
            return type(default)(text)
        except ValueError:
            raise XferkitError(f"{text!r} is not a valid {type(default).__name__}.") from None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
