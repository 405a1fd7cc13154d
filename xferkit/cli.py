"""Command line: parse options, call the library, print rich tables (or one JSON document)."""

from __future__ import annotations

import csv
import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from xferkit import pipeline
from xferkit.devices import DEVICE_CHOICES
from xferkit.errors import XferkitError
from xferkit.heads import HeadName
from xferkit.progress import console as err_console

app = typer.Typer(help="Repurpose pretrained CNNs for your own image classes.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console()

# Options shared by several commands, declared once.
Backbone = Annotated[str, typer.Option("--backbone", "-b", help="timm model name (e.g. resnet18, "
                     "resnet18.a1_in1k) or tv:NAME for torchvision (e.g. tv:mobilenet_v2).")]
Weights = Annotated[Path | None, typer.Option("--weights", help="Local checkpoint (safetensors or "
                    "torch state dict) instead of the published weights.")]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="--no-pretrained: "
                       "random weights, deliberately (a baseline, not transfer).")]
Layer = Annotated[str | None, typer.Option("--layer", help="Take features from this intermediate "
                  "layer (global-average-pooled); `xferkit backbones NAME --layers` lists them.")]
ImageSize = Annotated[int | None, typer.Option("--image-size", min=8, help="Override the "
                      "backbone's input size (square), e.g. 64-128 for small images on a CPU.")]
Device = Annotated[str, typer.Option("--device", help=f"One of {', '.join(DEVICE_CHOICES)} "
                   "(auto: CUDA when present).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
Workers = Annotated[int | None, typer.Option("--workers", min=0, help="Image-decoding processes "
                    "(default: chosen from the core count).")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature "
                    "cache ($XFERKIT_CACHE, default ~/.cache/xferkit).")]
Strict = Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable image "
                   "instead of skipping and counting it.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]


def _head_option(flag: str, help: str, **kwargs) -> typer.models.OptionInfo:
    """A repurpose option that sets one head hyper-parameter (grouped under "Head options")."""
    return typer.Option(flag, help=help, rich_help_panel="Head options", **kwargs)


def _options(device: str, batch_size: int, workers: int | None, no_cache: bool, strict: bool,
             as_json: bool) -> pipeline.ExtractOptions:
    return pipeline.ExtractOptions(device, batch_size, workers, False if no_cache else None, strict,
                                   progress=not as_json)


def _friendly_errors(command):
    """Turn an XferkitError into one red line and exit code 2; Ctrl-C into exit code 130."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except XferkitError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted; nothing was saved.[/]")
            raise typer.Exit(130) from None
    return wrapper


def command(fn):
    return app.command()(_friendly_errors(fn))


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _report_skipped(skipped: list, limit: int = 10) -> None:
    if not skipped:
        return
    err_console.print(f"[yellow]skipped {len(skipped)} unreadable file(s)[/] (--strict makes "
                      "this an error):", highlight=False)
    for path, reason in skipped[:limit]:
        err_console.print(f"  {path}: {reason}", highlight=False, markup=False, soft_wrap=True)
    if len(skipped) > limit:
        err_console.print(f"  ... and {len(skipped) - limit} more")


def _metrics_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


@command
def repurpose(
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class (or "
                                         "train/ val/ test/ folders of those), or a CSV of "
                                         "path,label.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Model folder to write "
                                                "(default: runs/BACKBONE-HEAD).")] = None,
    backbone: Backbone = "resnet18",
    head: Annotated[HeadName, typer.Option("--head", help="How to repurpose the features.")
                    ] = HeadName.lr,
    C: Annotated[float | None, _head_option(
        "--C", "lr: inverse regularisation strength (default: chosen on the validation split).")] = None,
    epochs: Annotated[int | None, _head_option(
        "--epochs", "finetune, scratch, bnn, gp: maximum training epochs.", min=1)] = None,
    lr: Annotated[float | None, _head_option(
        "--lr", "finetune, scratch, bnn, gp: learning rate.")] = None,
    weight_decay: Annotated[float | None, _head_option(
        "--weight-decay", "finetune, scratch: AdamW weight decay.")] = None,
    max_time: Annotated[float | None, _head_option(
        "--max-time", "finetune, scratch: stop training after this many seconds.")] = None,
    unfreeze: Annotated[str | None, _head_option(
        "--unfreeze", "finetune: how many of the last backbone blocks train (0 = classifier only, 'all' = "
                      "everything).")] = None,
    backbone_lr_mult: Annotated[float | None, _head_option(
        "--backbone-lr-mult", "finetune: backbone lr = --lr x this.")] = None,
    label_smoothing: Annotated[float | None, _head_option(
        "--label-smoothing", "finetune, scratch: label smoothing in [0, 1).")] = None,
    random_freeze: Annotated[float | None, _head_option(
        "--random-freeze", "finetune: freeze this random fraction of each unfrozen layer's weights.")] = None,
    arch: Annotated[str | None, _head_option(
        "--arch", "scratch: train this timm architecture instead of --backbone's.")] = None,
    gp_method: Annotated[str | None, _head_option(
        "--gp-method", "gp: exact, svgp or auto (by data size).")] = None,
    inducing: Annotated[int | None, _head_option(
        "--inducing", "gp (svgp): inducing points.", min=1)] = None,
    gp_dim: Annotated[int | None, _head_option(
        "--gp-dim", "gp: project features to this many dimensions first.", min=1)] = None,
    mc_samples: Annotated[int | None, _head_option(
        "--mc-samples", "bnn: posterior samples averaged at prediction.", min=1)] = None,
    hidden: Annotated[int | None, _head_option(
        "--hidden", "bnn: hidden units (0 = one layer).", min=0)] = None,
    prior_std: Annotated[float | None, _head_option(
        "--prior-std", "bnn: std of the Gaussian weight prior.")] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="Fraction of each class held "
                                             "out for validation (when DATA has no val/).")
                         ] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split and the head.")] = 0,
    weights: Weights = None, pretrained: Pretrained = True, layer: Layer = None,
    image_size: ImageSize = None, device: Device = "auto", batch_size: BatchSize = 64,
    workers: Workers = None, no_cache: NoCache = False, strict: Strict = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output folder.")
                     ] = False,
    as_json: Json = False,
) -> None:
    """Extract features of DATA with a pretrained backbone and fit a head on them."""
    output = output or Path("runs") / f"{backbone.replace(':', '_').replace('/', '_')}-{head.value}"
    started = time.perf_counter()
    result = pipeline.repurpose(
        data, pipeline.BackboneOptions(backbone, weights, pretrained, layer, image_size),
        head.value, output,
        {"C": C, "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "max_time": max_time,
         "unfreeze": unfreeze, "backbone_lr_mult": backbone_lr_mult,
         "label_smoothing": label_smoothing, "random_freeze": random_freeze, "arch": arch,
         "method": gp_method, "inducing": inducing, "dim": gp_dim, "mc_samples": mc_samples,
         "hidden": hidden, "prior_std": prior_std},
        val_split, seed, force,
        _options(device, batch_size, workers, no_cache, strict, as_json))
    model = result.model
    summary = {"output": str(output), "backbone": model.backbone.spec(), "classes": model.classes,
               "head": model.head.name, "head_params": model.head.get_params(),
               "validation_metrics": model.metrics, "info": model.info,
               "seconds": round(time.perf_counter() - started, 2),
               "skipped": pipeline._skipped_json(result.skipped)}
    if as_json:
        return _print_json(summary)
    err_console.print(f"backbone [bold]{model.backbone.name}[/]: {model.backbone.weights_source}",
                      highlight=False)
    for note in result.notes:
        err_console.print(note)
    _report_skipped(result.skipped)
    if model.metrics:
        out.print(_metrics_table(model.metrics, f"validation ({model.head.name} head)"))
    out.print(f"saved [bold]{output}[/] ({len(model.classes)} classes, "
              f"{model.info['n_train']} training images) in {summary['seconds']:.1f}s")


@command
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model folder written by repurpose.")],
    data: Annotated[Path | None, typer.Argument(help="Labelled test folder or CSV (default: "
                                                "the test/ folder of the training data).")] = None,
    plots: Annotated[Path | None, typer.Option("--plots", help="Write confusion-matrix and "
                                               "reliability PNGs into this folder.")] = None,
    min_accuracy: Annotated[float | None, typer.Option("--min-accuracy", help="Exit with code 1 "
                                                       "if test accuracy is below this.")] = None,
    device: Device = "auto", batch_size: BatchSize = 64, workers: Workers = None,
    no_cache: NoCache = False, strict: Strict = False, as_json: Json = False,
) -> None:
    """Report accuracy, macro-F1, NLL, calibration (ECE), Brier and the confusion matrix."""
    loaded = pipeline.load_model(model)
    if data is None:
        data = Path(loaded.info.get("data", "")) / "test"
        if not data.is_dir():
            raise XferkitError(f"no test data given and {data} does not exist; "
                               "pass the labelled test folder: xferkit evaluate MODEL DATA.")
    result = pipeline.evaluate(loaded, data,
                               _options(device, batch_size, workers, no_cache, strict, as_json))
    report = result.to_json()
    if plots is not None:
        from xferkit.plots import plot_confusion, plot_reliability

        report["plots"] = [str(plot_confusion(result.confusion, result.classes,
                                              plots / "confusion_matrix.png")),
                           str(plot_reliability({loaded.head.name: (result.y_true, result.proba)},
                                                plots / "reliability.png"))]
    if as_json:
        _print_json(report)
    else:
        _report_skipped(result.skipped)
        out.print(_metrics_table(result.metrics, f"test metrics: {data}"))
        table = Table(title="per class")
        for column in ("class", "precision", "recall", "f1", "support"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for row in result.per_class:
            table.add_row(row["class"], *(f"{row[k]:.3f}" for k in ("precision", "recall", "f1")),
                          str(row["support"]))
        out.print(table)
        out.print(_confusion_table(result.confusion, result.classes))
        for path in report.get("plots", []):
            out.print(f"wrote {path}")
    if min_accuracy is not None and result.metrics["accuracy"] < min_accuracy:
        err_console.print(f"[red]accuracy {result.metrics['accuracy']:.4f} is below "
                          f"--min-accuracy {min_accuracy}[/]")
        raise typer.Exit(1)


def _confusion_table(matrix, classes: list[str]) -> Table:
    table = Table(title="confusion matrix (rows: true, columns: predicted)")
    table.add_column("")
    for name in classes:
        table.add_column(name, justify="right")
    for name, row in zip(classes, matrix, strict=True):
        table.add_row(name, *(f"[bold]{v}[/]" if i == j else str(v) if v else "[dim]0[/]"
                              for j, v in enumerate(row) for i in [classes.index(name)]))
    return table


@command
def predict(
    model: Annotated[Path, typer.Argument(help="Model folder written by repurpose.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many labels to show.")] = 3,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Also write the predictions "
                                                  "to this CSV file.")] = None,
    device: Device = "auto", batch_size: BatchSize = 64, workers: Workers = None,
    no_cache: NoCache = False, strict: Strict = False, as_json: Json = False,
) -> None:
    """Label new images, with probabilities, top-k labels and an uncertainty."""
    rows, skipped = pipeline.predict(model, images, top_k,
                                     _options(device, batch_size, workers, no_cache, strict,
                                              as_json))
    if csv_path is not None:
        _write_predictions_csv(rows, csv_path)
    if as_json:
        return _print_json({"predictions": [r.to_json() for r in rows],
                            "skipped": pipeline._skipped_json(skipped)})
    _report_skipped(skipped)
    table = Table(title=f"predictions ({len(rows)} images)")
    for column in ("image", "label", "probability", f"top {top_k}",
                   *(rows[0].uncertainty if rows else ())):
        table.add_column(column, justify="left" if column in ("image", "label") else "right")
    for r in rows:
        table.add_row(str(r.path), r.label, f"{r.probability:.3f}",
                      ", ".join(f"{c} {p:.2f}" for c, p in r.top_k),
                      *(f"{v:.3f}" for v in r.uncertainty.values()))
    out.print(table)


def _write_predictions_csv(rows: list[pipeline.Prediction], path: Path) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys = list(rows[0].uncertainty) if rows else []
    writer.writerow(["path", "label", "probability", "top_k", *keys])
    for r in rows:
        writer.writerow([r.path, r.label, f"{r.probability:.6f}",
                         ";".join(f"{c}:{p:.6f}" for c, p in r.top_k),
                         *(f"{r.uncertainty[k]:.6f}" for k in keys)])
    pipeline.atomic_write_bytes(path, buffer.getvalue().encode())


@command
def extract(
    data: Annotated[Path, typer.Argument(help="Labelled folder (one sub-folder per class) or CSV.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="safetensors file to write "
                                         "(features, labels; classes and paths in metadata).")],
    backbone: Backbone = "resnet18", weights: Weights = None, pretrained: Pretrained = True,
    layer: Layer = None, image_size: ImageSize = None, device: Device = "auto",
    batch_size: BatchSize = 64, workers: Workers = None, no_cache: NoCache = False,
    strict: Strict = False, as_json: Json = False,
) -> None:
    """Save backbone features of a labelled folder, for use outside xferkit."""
    feats, images = pipeline.extract(
        data, output, pipeline.BackboneOptions(backbone, weights, pretrained, layer, image_size),
        _options(device, batch_size, workers, no_cache, strict, as_json))
    summary = {"output": str(output), "n": int(len(feats.kept)), "dim": int(feats.features.shape[1]),
               "classes": images.classes, "skipped": pipeline._skipped_json(feats.skipped)}
    if as_json:
        return _print_json(summary)
    _report_skipped(feats.skipped)
    out.print(f"wrote {summary['n']} x {summary['dim']} features to [bold]{output}[/]")


@command
def backbones(
    pattern: Annotated[str, typer.Argument(help="Substring or glob of model names.")] = "",
    pretrained_only: Annotated[bool, typer.Option("--pretrained", help="Only timm models with "
                                                  "published weights.")] = False,
    layers: Annotated[bool, typer.Option("--layers", help="List the --layer names of the one "
                                         "backbone named by PATTERN.")] = False,
    as_json: Json = False,
) -> None:
    """List backbones (timm names, and tv:NAME for torchvision) matching PATTERN."""
    from xferkit.backbones import layer_names, list_backbones

    names = layer_names(pattern) if layers else list_backbones(pattern, pretrained_only)
    if as_json:
        return _print_json(names)
    for name in names:
        out.print(name, highlight=False)
    err_console.print(f"{len(names)} {'layers' if layers else 'backbones'}")


Epochs = Annotated[int | None, typer.Option("--epochs", min=1, help="Maximum training epochs of "
                   "every head that takes epochs (finetune, scratch, bnn, gp).")]
MaxTime = Annotated[float | None, typer.Option("--max-time", help="Stop each pixel head's training "
                    "(finetune, scratch) after this many seconds.")]
ValSplit = Annotated[float, typer.Option("--val-split", help="Fraction of each class held out for "
                     "validation (when DATA has no val/).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for the splits and the heads.")]


@command
def compare(
    data: Annotated[Path, typer.Argument(help="Labelled folder (or train/ val/ test/ folders, or "
                                         "a CSV), as for repurpose.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.json, the "
                                         "plots and one model folder per head.")
                      ] = Path("runs/compare"),
    heads: Annotated[str | None, typer.Option("--heads", help="Comma-separated heads to compare "
                                              "(default: every registered head).")] = None,
    backbone: Backbone = "resnet18", epochs: Epochs = None, max_time: MaxTime = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help="HEAD.PARAM=VALUE for one "
                                                       "head, e.g. --set finetune.epochs=2 "
                                                       "(repeatable).")] = None,
    val_split: ValSplit = 0.2,
    test_split: Annotated[float, typer.Option("--test-split", help="Fraction of each class held "
                                              "out for testing when DATA has no test/.")] = 0.2,
    seed: Seed = 0,
    learning_curve: Annotated[bool, typer.Option("--learning-curve", help="Also plot test accuracy "
                                                 "against training examples per class for lr "
                                                 "and scratch (several extra fits).")] = False,
    weights: Weights = None, pretrained: Pretrained = True, layer: Layer = None,
    image_size: ImageSize = None, device: Device = "auto", batch_size: BatchSize = 64,
    workers: Workers = None, no_cache: NoCache = False, strict: Strict = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing comparison.")] = False,
    as_json: Json = False,
) -> None:
    """Fit every head on one split of DATA and compare accuracy, calibration and cost."""
    from xferkit.compare import compare as run_compare
    from xferkit.compare import parse_head_settings

    result = run_compare(
        data, pipeline.BackboneOptions(backbone, weights, pretrained, layer, image_size),
        [h.strip() for h in heads.split(",") if h.strip()] if heads else None, output,
        {"epochs": epochs, "max_time": max_time}, parse_head_settings(settings or []),
        val_split, test_split, seed, learning_curve, force,
        _options(device, batch_size, workers, no_cache, strict, as_json))
    report = result.to_json()
    if as_json:
        return _print_json(report)
    for note in result.notes:
        err_console.print(note, highlight=False)
    out.print(_comparison_table(result))
    for row in result.rows:
        if row.status == "failed":
            err_console.print(f"{row.head} failed: {row.error}", style="red", markup=False,
                              highlight=False)
    out.print(f"wrote {output / 'report.json'}, {len(result.plots)} plot(s) and one model folder "
              "per head (use one with `xferkit predict`)")


def _comparison_table(result) -> Table:
    from xferkit.compare import COLUMNS

    formats = {"accuracy": ".3f", "macro_f1": ".3f", "nll": ".3f", "ece": ".3f", "brier": ".3f",
               "fit_seconds": ".1f", "predict_ms_per_image": ".2f", "size_mb": ".3g"}
    titles = {"accuracy": "acc", "macro_f1": "F1", "nll": "NLL", "ece": "ECE", "brier": "Brier",
              "fit_seconds": "fit s", "predict_ms_per_image": "ms/img", "size_mb": "MB"}
    sizes = result.sizes
    table = Table(title=f"test set: {sizes['test']} images (train {sizes['train']}, val "
                        f"{sizes['val']}); best of each column in bold green",
                  caption="F1: macro-F1; fit s excludes the shared feature extraction; ms/img: "
                          "prediction end to end (backbone included); MB: model folder")
    table.add_column("head", no_wrap=True)
    for column in COLUMNS:
        table.add_column(titles[column], justify="right")
    best = result.best()
    for row in result.rows:
        if row.status != "ok":
            table.add_row(row.head, "[red]failed[/]", *[""] * (len(COLUMNS) - 1))
            continue
        table.add_row(row.head, *(f"[bold green]{row.metrics[c]:{formats[c]}}[/]" if best[c] == row.head
                                  else f"{row.metrics[c]:{formats[c]}}" for c in COLUMNS))
    return table


@command
def tune(
    data: Annotated[Path, typer.Argument(help="Labelled folder (or CSV), as for repurpose.")],
    head: Annotated[HeadName, typer.Option("--head", help="The head whose hyper-parameters to "
                                           "tune.")] = HeadName.lr,
    trials: Annotated[int, typer.Option("--trials", min=1, help="Trials in all (a re-run with the "
                                        "same -o continues up to this many).")] = 20,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the trials "
                                                "journal, table, plot and the best model "
                                                "(default: runs/tune-HEAD).")] = None,
    backbone: Backbone = "resnet18", epochs: Epochs = None, max_time: MaxTime = None,
    val_split: ValSplit = 0.2, seed: Seed = 0,
    weights: Weights = None, pretrained: Pretrained = True, layer: Layer = None,
    image_size: ImageSize = None, device: Device = "auto", batch_size: BatchSize = 64,
    workers: Workers = None, no_cache: NoCache = False, strict: Strict = False,
    as_json: Json = False,
) -> None:
    """Bayesian optimisation (GP surrogate) of a head's hyper-parameters by validation NLL."""
    from rich.text import Text

    from xferkit.tune import tune as run_tune

    output = output or Path("runs") / f"tune-{head.value}"
    result = run_tune(data, pipeline.BackboneOptions(backbone, weights, pretrained, layer, image_size),
                      head.value, output, trials, {"epochs": epochs, "max_time": max_time}, val_split,
                      seed, _options(device, batch_size, workers, no_cache, strict, as_json))
    if as_json:
        return _print_json(result.to_json())
    for note in result.notes:
        err_console.print(note, highlight=False)
    names = sorted({k for r in result.trials for k in r.params})
    table = Table(title=f"{len(result.trials)} trials of {head.value} (best in bold green)")
    for column in ("trial", *names, "val NLL", "val acc", "seconds"):
        table.add_column(column, justify="right")
    for r in result.trials:
        cells = [str(r.number), *(_cell(r.params.get(k)) for k in names),
                 *((f"{r.val_nll:.4f}", f"{r.val_accuracy:.3f}") if r.error is None
                   else ("[red]failed[/]", Text(r.error[:40]))), f"{r.seconds:.1f}"]
        table.add_row(*cells, style="bold green" if r.number == result.best.number else None)
    out.print(table)
    out.print(f"validation NLL: {result.baseline['nll']:.4f} with the default hyper-parameters, "
              f"{result.best.val_nll:.4f} with the best trial ({result.best.number})")
    if result.test_metrics:
        out.print(_metrics_table(result.test_metrics, "test metrics of the refitted best model"))
    out.print(f"saved [bold]{result.model_folder}[/] (best configuration refitted on train+val); "
              f"wrote {', '.join(result.files)}")


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
