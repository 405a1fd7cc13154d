"""The commands: parse options, call the library (``xferkit.api``), print rich tables or one JSON document.

Imports of the library happen inside each command, so ``xferkit --help`` loads neither torch nor
scikit-learn.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from xferkit.cli import render
from xferkit.cli.options import (
    BACKBONE,
    EXTRACT,
    HEAD_FLAGS,
    SPLIT,
    Backbone,
    BatchSize,
    Calibrate,
    Coverage,
    Device,
    Force,
    Head,
    ImageSize,
    Json,
    Layer,
    NoCache,
    OodRate,
    Pretrained,
    Seed,
    Settings,
    Strict,
    ValSplit,
    Weights,
    Workers,
    with_head_flags,
)
from xferkit.cli.reporter import RichReporter, console
from xferkit.core.errors import XferkitError
from xferkit.model.options import BackboneOptions, ExtractOptions
from xferkit.model.registry import HeadName, head_names, head_params, parse_settings


class _Command(typer.core.TyperCommand):
    """Typer's command with ``--help`` shown as the flag it is (no ``<bool>`` value)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Group(typer.core.TyperGroup, _Command):
    pass


app = typer.Typer(help="Repurpose pretrained CNNs for your own image classes.", cls=_Group,
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console()


def command(fn, group: typer.Typer | None = None):
    """Register *fn* as a command whose expected failures are one red line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 prints; every rank's error shows
        try:
            with _quiet() if rank else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except XferkitError as err:
            where = f"rank {rank}: " if rank else ""
            console.print(f"[bold red]error:[/] {where}{escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: no model was saved (features extracted so far are "
                          "cached).[/]")
            raise typer.Exit(130) from None
    return (group or app).command(cls=_Command)(wrapper)


@contextlib.contextmanager
def _quiet():
    """Nothing on stdout or stderr (the other torchrun ranks: rank 0 speaks for them)."""
    console.quiet = True
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield
    finally:
        console.quiet = False


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _extract_options(device: str, batch_size: int, workers: int | None, no_cache: bool,
                     strict: bool) -> ExtractOptions:
    return ExtractOptions(device, batch_size, workers, not no_cache, strict)


def _report_skipped(skipped: list, limit: int = 10) -> None:
    if not skipped:
        return
    console.print(f"[yellow]skipped {len(skipped)} unreadable file(s)[/] (--strict makes this an error):",
                  highlight=False)
    for path, reason in skipped[:limit]:
        console.print(Text(f"  {path}: {reason}"), highlight=False, soft_wrap=True)
    if len(skipped) > limit:
        console.print(f"  ... and {len(skipped) - limit} more")


def _one_head_params(head: str, settings: list[str] | None, flags: dict) -> dict:
    """The hyper-parameters given for *head* by ``--set`` and the shortcut flags; others are errors."""
    parsed = parse_settings(settings or [], head)
    for other in sorted(set(parsed) - {head}):
        raise XferkitError(f"--set {other}.{next(iter(parsed[other]))} does not apply: this command runs "
                           f"the {head} head.")
    declared = head_params(head)
    foreign = [flag for flag, param in HEAD_FLAGS.items() if param in flags and param not in declared]
    if foreign:
        raise XferkitError(f"the {head} head does not take {', '.join(foreign)}.")
    return {**flags, **parsed.get(head, {})}


DataArgument = Annotated[Path, typer.Argument(metavar="DATA", help="Folder with one sub-folder per class (or "
                                              "train/ val/ test/ folders of those), or a CSV of path,label.")]
ModelArgument = Annotated[Path, typer.Argument(metavar="MODEL", help="Model folder written by repurpose (or, "
                                               "to predict and evaluate, a .onnx file written by export).")]


@command
@with_head_flags
def repurpose(
    data: DataArgument,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Model folder to write "
                                                "(default: runs/BACKBONE-HEAD).")] = None,
    backbone: Backbone = BACKBONE.name, head: Head = HeadName.lr, settings: Settings = None,
    val_split: ValSplit = SPLIT.val_split, seed: Seed = SPLIT.seed, calibrate: Calibrate = True,
    weights: Weights = None, pretrained: Pretrained = True, layer: Layer = None, image_size: ImageSize = None,
    device: Device = EXTRACT.device, batch_size: BatchSize = EXTRACT.batch_size, workers: Workers = None,
    no_cache: NoCache = False, strict: Strict = False, force: Force = False, as_json: Json = False,
    head_flags: dict | None = None,
) -> None:
    """Extract features of DATA with a pretrained backbone and fit a head on them (or fine-tune it)."""
    from xferkit.api import repurpose as run
    from xferkit.api.results import default_output

    head = head.value
    params = _one_head_params(head, settings, head_flags or {})
    output = output or default_output(backbone, head)
    result = run(data, backbone=BackboneOptions(backbone, weights, pretrained, layer, image_size), head=head,
                 params=params, output=output, val_split=val_split, seed=seed, calibrate=calibrate,
                 force=force, options=_extract_options(device, batch_size, workers, no_cache, strict),
                 reporter=RichReporter())
    summary = result.to_json()
    if as_json:
        return _print_json(summary)
    _report_skipped(result.skipped)
    model = result.model
    if model.metrics:
        out.print(render.metrics_table(model.metrics, f"validation ({model.head} head"
                                       + (", calibrated)" if model.calibration else ")")))
    if model.calibration:
        c = model.calibration
        out.print(f"calibration: temperature {c.temperature:.3f}; validation NLL {c.nll_before:.4f} -> "
                  f"{c.nll_after:.4f}, ECE {c.ece_before:.4f} -> {c.ece_after:.4f}")
    if model.held_out:
        held = model.held_out
        out.print(Text(f"held out for prediction sets (--coverage) and OOD flags (by {held.ood_score}): "
                       f"{len(held.conformal_scores)} images, {held.source}"))
    out.print(Text(f"saved {output} ({len(model.classes)} classes, {model.info['n_train']} training images) "
                   f"in {summary['seconds']:.1f}s"))


@command
def evaluate(
    model: ModelArgument,
    data: Annotated[Path | None, typer.Argument(metavar="DATA", help="Labelled test folder or CSV (default: "
                                                "the test/ folder of the training data).")] = None,
    plots: Annotated[Path | None, typer.Option("--plots", metavar="FOLDER", help="Write confusion-matrix and "
                                               "reliability PNGs into this folder.")] = None,
    min_accuracy: Annotated[float | None, typer.Option("--min-accuracy", min=0.0, max=1.0, help="Exit with "
                                                       "code 1 if test accuracy is below this.")] = None,
    coverage: Coverage = None,
    ood: Annotated[Path | None, typer.Option("--ood", metavar="FOLDER", help="Images of another kind: report "
                                             "the AUROC of the out-of-distribution score between DATA and "
                                             "them, and the share flagged at --ood-rate.")] = None,
    ood_rate: OodRate = None,
    device: Device = EXTRACT.device, batch_size: BatchSize = EXTRACT.batch_size, workers: Workers = None,
    no_cache: NoCache = False, strict: Strict = False, as_json: Json = False,
) -> None:
    """Report accuracy, macro-F1, NLL, calibration (ECE), Brier and the confusion matrix.

    --coverage adds the coverage and mean size of prediction sets; --ood the OOD detection.
    """
    from xferkit.api import evaluate as run

    result = run(model, data, options=_extract_options(device, batch_size, workers, no_cache, strict),
                 plots=plots, coverage=coverage, ood=ood, reporter=RichReporter(),
                 **({"ood_rate": ood_rate} if ood_rate is not None else {}))
    if as_json:
        _print_json(result.to_json())
    else:
        _report_skipped(result.skipped)
        out.print(render.metrics_table(result.metrics, f"test metrics: {result.data}"))
        out.print(render.per_class_table(result.per_class))
        out.print(render.confusion_table(result.confusion, result.classes))
        for path in result.plots:
            out.print(Text(f"wrote {path}"))
    if min_accuracy is not None and result.metrics["accuracy"] < min_accuracy:
        console.print(f"[red]accuracy {result.metrics['accuracy']:.4f} is below --min-accuracy "
                      f"{min_accuracy}[/]")
        raise typer.Exit(1)


@command
def predict(
    model: ModelArgument,
    images: Annotated[list[Path], typer.Argument(metavar="IMAGES", help="Image files or folders of images.")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=1000, help="How many labels to show.")] = 3,
    csv_path: Annotated[Path | None, typer.Option("--csv", metavar="FILE", help="Also write the predictions "
                                                  "to this CSV file.")] = None,
    coverage: Coverage = None, ood_rate: OodRate = None,
    device: Device = EXTRACT.device, batch_size: BatchSize = EXTRACT.batch_size, workers: Workers = None,
    no_cache: NoCache = False, strict: Strict = False, as_json: Json = False,
) -> None:
    """Label new images, with probabilities, top-k labels, uncertainties and an out-of-distribution flag."""
    from xferkit.api import predict as run

    result = run(model, images, top_k=top_k, csv=csv_path, coverage=coverage, ood_rate=ood_rate,
                 reporter=RichReporter(),
                 options=_extract_options(device, batch_size, workers, no_cache, strict))
    if as_json:
        return _print_json(result.to_json())
    _report_skipped(result.skipped)
    out.print(render.predictions_table(result, top_k, coverage))


@command
def extract(
    data: DataArgument,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="safetensors file to write "
                                         "(features, labels; classes and paths in metadata).")],
    backbone: Backbone = BACKBONE.name, weights: Weights = None, pretrained: Pretrained = True,
    layer: Layer = None, image_size: ImageSize = None, device: Device = EXTRACT.device,
    batch_size: BatchSize = EXTRACT.batch_size, workers: Workers = None, no_cache: NoCache = False,
    strict: Strict = False, force: Force = False, as_json: Json = False,
) -> None:
    """Save backbone features of a labelled folder, for use outside xferkit."""
    from xferkit.api import extract as run

    result = run(data, output, backbone=BackboneOptions(backbone, weights, pretrained, layer, image_size),
                 options=_extract_options(device, batch_size, workers, no_cache, strict), force=force,
                 reporter=RichReporter())
    summary = result.to_json()
    if as_json:
        return _print_json(summary)
    _report_skipped(result.features.skipped)
    out.print(Text(f"wrote {summary['n']} x {summary['dim']} features to {output}"))


@command
def backbones(
    pattern: Annotated[str, typer.Argument(metavar="PATTERN", help="Glob (resnet*, tv:*) or substring of "
                                           "names; matches timm and tv: torchvision names.")] = "",
    published: Annotated[bool, typer.Option("--published", metavar="", help="Only backbones with published "
                                            "pretrained weights.")] = False,
    local: Annotated[bool, typer.Option("--local", metavar="", help="Only backbones whose weights are here "
                                        "already (cache or installed package): no download needed.")] = False,
    layers: Annotated[bool, typer.Option("--layers", metavar="", help="List the --layer names of the one "
                                         "backbone named by PATTERN.")] = False,
    as_json: Json = False,
) -> None:
    """List backbones (timm names, and tv:NAME for torchvision) and where their weights are."""
    from xferkit.backbones import layer_names, list_backbones

    if layers:
        names = layer_names(pattern)
        if as_json:
            return _print_json(names)
        for name in names:
            out.print(Text(name))
        return console.print(f"{len(names)} layers")
    listings = list_backbones(pattern, published_only=published, local_only=local)
    if as_json:
        return _print_json([item.name for item in listings])
    for item in listings:
        out.print(render.backbone_line(item), highlight=False)
    console.print(f"{len(listings)} backbones, {sum(1 for i in listings if i.local)} with weights here")


@command
@with_head_flags
def compare(
    data: DataArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json, the "
                                         "plots and one model folder per head.")] = Path("runs/compare"),
    heads: Annotated[str | None, typer.Option("--heads", help="Comma-separated heads to compare "
                                              f"(default: all of {', '.join(head_names())}).")] = None,
    backbone: Backbone = BACKBONE.name, settings: Settings = None,
    val_split: ValSplit = SPLIT.val_split,
    test_split: Annotated[float, typer.Option("--test-split", min=0.0, max=0.9, help="Fraction of each "
                                              "class held out for testing when DATA has no test/.")
                          ] = SPLIT.test_split,
    seed: Seed = SPLIT.seed, calibrate: Calibrate = True,
    learning_curve: Annotated[bool, typer.Option("--learning-curve", metavar="", help="Also plot test "
                                                 "accuracy against training examples per class for lr and "
                                                 "scratch (several extra fits).")] = False,
    weights: Weights = None, pretrained: Pretrained = True, layer: Layer = None,
    image_size: ImageSize = None, device: Device = EXTRACT.device, batch_size: BatchSize = EXTRACT.batch_size,
    workers: Workers = None, no_cache: NoCache = False, strict: Strict = False, force: Force = False,
    as_json: Json = False, head_flags: dict | None = None,
) -> None:
    """Fit every head on one split of DATA and compare accuracy, calibration and cost."""
    from xferkit.api import compare as run

    result = run(data, backbone=BackboneOptions(backbone, weights, pretrained, layer, image_size),
                 heads=[h.strip() for h in heads.split(",") if h.strip()] if heads else None, output=output,
                 common_params=head_flags, head_params=parse_settings(settings or []), val_split=val_split,
                 test_split=test_split, seed=seed, learning_curve=learning_curve, calibrate=calibrate,
                 force=force, options=_extract_options(device, batch_size, workers, no_cache, strict),
                 reporter=RichReporter())
    if as_json:
        return _print_json(result.to_json())
    out.print(render.comparison_table(result))
    for row in result.rows:
        if row.status == "failed":
            console.print(Text(f"{row.head} failed: {row.error}", style="red"), highlight=False)
    out.print(Text(f"wrote {output / 'report.json'}, {len(result.plots)} plot(s) and one model folder per "
                   "head (use one with `xferkit predict`)"))


@command
@with_head_flags
def tune(
    data: DataArgument,
    head: Head = HeadName.lr,
    trials: Annotated[int, typer.Option("--trials", min=1, max=10000, help="Trials in all (a re-run with the "
                                        "same -o continues up to this many). Pruned, the trials train at "
                                        "most half of TRIALS x epochs, and as many run as that holds.")] = 20,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the trials journal, "
                                                "table, plot and the best model (default: "
                                                "runs/tune-HEAD).")] = None,
    prune: Annotated[bool, typer.Option("--prune/--no-prune", metavar="", help="Stop trials whose validation "
                                        "NLL trails the others' at the same epoch (Hyperband; heads "
                                        "that train by epochs: bnn, finetune, scratch); the GP learns "
                                        "from a stopped trial the NLL it stopped at.")] = True,
    backbone: Backbone = BACKBONE.name, settings: Settings = None,
    val_split: ValSplit = SPLIT.val_split, seed: Seed = SPLIT.seed, calibrate: Calibrate = True,
    weights: Weights = None, pretrained: Pretrained = True, layer: Layer = None,
    image_size: ImageSize = None, device: Device = EXTRACT.device, batch_size: BatchSize = EXTRACT.batch_size,
    workers: Workers = None, no_cache: NoCache = False, strict: Strict = False, as_json: Json = False,
    head_flags: dict | None = None,
) -> None:
    """Bayesian optimisation (GP surrogate) of a head's hyper-parameters by validation NLL.

    Parameters given with --set or the head flags stay fixed; the others are searched.
    """
    from xferkit.api import tune as run
    from xferkit.api.tuning import PRUNER

    head = head.value
    fixed = _one_head_params(head, settings, head_flags or {})
    output = output or Path("runs") / f"tune-{head}"
    result = run(data, backbone=BackboneOptions(backbone, weights, pretrained, layer, image_size), head=head,
                 output=output, trials=trials, head_params=fixed, val_split=val_split, seed=seed,
                 calibrate=calibrate, pruner=PRUNER if prune else None,
                 options=_extract_options(device, batch_size, workers, no_cache, strict),
                 reporter=RichReporter())
    if as_json:
        return _print_json(result.to_json())
    out.print(render.trials_table(result))
    out.print(f"validation NLL: {result.baseline['nll']:.4f} with the default hyper-parameters, "
              f"{result.best.val_nll:.4f} with the best trial ({result.best.number})")
    if result.test_metrics:
        out.print(render.metrics_table(result.test_metrics, "test metrics of the refitted best model"))
    out.print(Text(f"saved {result.model_folder} (the best configuration refitted: feature heads on "
                   f"train+val, calibrated by cross-fitting); wrote {', '.join(result.files)}"))


cache_app = typer.Typer(help="See, check and empty the feature cache ($XFERKIT_CACHE, default "
                        "~/.cache/xferkit).", cls=_Group, no_args_is_help=True)
app.add_typer(cache_app, name="cache")
CacheRoot = Annotated[Path | None, typer.Option("--cache-dir", metavar="FOLDER", help="The cache folder "
                                                "(default: $XFERKIT_CACHE, else ~/.cache/xferkit).")]


def _print_cache(report) -> None:
    for entry in report.folders:
        name = (entry.extractor or {}).get("name", "?")
        out.print(Text(f"{entry.folder.name}  {name:<32} {entry.rows:>8} rows {entry.shards:>5} shards "
                       f"{entry.bytes / 1e6:>9.1f} MB"))
    total = report.to_json()
    console.print(f"{len(report.folders)} extractor(s), {total['rows']} rows, {total['bytes'] / 1e6:.1f} MB "
                  f"in {escape(str(report.root))}", highlight=False)


def cache_command(fn):
    """Register *fn* as a ``cache`` sub-command with the same error handling as the others."""
    return command(fn, cache_app)


@cache_command
def info(root: CacheRoot = None, as_json: Json = False) -> None:
    """What the cache holds, per extractor (backbone, weights, layer, preprocessing)."""
    from xferkit.api import cache_info

    report = cache_info(root)
    _print_json(report.to_json()) if as_json else _print_cache(report)


@cache_command
def verify(root: CacheRoot = None, as_json: Json = False) -> None:
    """Read and check every shard; damaged ones are dropped and their images extracted again when needed."""
    from xferkit.api import cache_verify

    report = cache_verify(root, reporter=RichReporter())
    if as_json:
        return _print_json(report.to_json())
    _print_cache(report)
    out.print(f"checked {report.checked} shard(s), dropped {report.dropped} damaged one(s)")


@cache_command
def clear(root: CacheRoot = None,
          yes: Annotated[bool, typer.Option("--yes", metavar="", help="Do not ask to confirm.")] = False,
          as_json: Json = False) -> None:
    """Delete the cached features (only the folders xferkit wrote there)."""
    from xferkit.api import cache_clear, cache_info

    if not yes and not typer.confirm(f"delete {len(cache_info(root).folders)} extractor folder(s) of cached "
                                     "features?", err=True):
        raise typer.Exit(1)
    report = cache_clear(root)
    if as_json:
        return _print_json(report.to_json())
    out.print(f"removed {len(report.folders)} extractor folder(s), {report.removed_bytes / 1e6:.1f} MB")


@command
def export(
    model: ModelArgument,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="ONNX file to write "
                                         "(.onnx); `xferkit predict FILE IMAGES` reads it back.")],
    exporter: Annotated[str, typer.Option("--exporter", help="torch's ONNX exporter: auto (dynamo, else "
                                          "torchscript), dynamo or torchscript.")] = "auto",
    force: Force = False, as_json: Json = False,
) -> None:
    """Export a model to one ONNX graph (uint8 images in, calibrated probabilities out) for onnxruntime."""
    from xferkit.api import export as run

    result = run(model, output, force=force, exporter=exporter, reporter=RichReporter())
    summary = result.to_json()
    if as_json:
        return _print_json(summary)
    out.print(Text(f"wrote {output} ({summary['bytes'] / 1e6:.1f} MB; {summary['head']} head as "
                   f"{summary['head_method']}, {summary['exporter']} exporter; onnxruntime matches torch "
                   f"within {summary['onnxruntime_vs_torch_max_abs_diff']:.1e})"))
