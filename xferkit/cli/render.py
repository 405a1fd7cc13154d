"""Tables for the terminal. Every text that comes from the user's data (class names, paths, reasons)
enters as a ``rich.text.Text``, so markup in it is printed, never interpreted."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

#: How compare's columns are titled and formatted.
COLUMN_TITLES = {"accuracy": ("acc", ".3f"), "macro_f1": ("F1", ".3f"), "nll": ("NLL", ".3f"),
                 "ece": ("ECE", ".3f"), "brier": ("Brier", ".3f"), "coverage": ("cov@.9", ".3f"),
                 "mean_set_size": ("set", ".2f"), "fit_seconds": ("fit s", ".1f"),
                 "predict_ms_per_image": ("ms/img", ".2f"), "size_mb": ("MB", ".3g")}


def metrics_table(metrics: dict, title: str) -> Table:
    table = Table(title=Text(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def per_class_table(rows: list[dict]) -> Table:
    table = Table(title="per class")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in rows:
        table.add_row(Text(row["class"]), *(f"{row[k]:.3f}" for k in ("precision", "recall", "f1")),
                      str(row["support"]))
    return table


def confusion_table(matrix, classes: list[str]) -> Table:
    table = Table(title="confusion matrix (rows: true, columns: predicted)")
    table.add_column("")
    for name in classes:
        table.add_column(Text(name), justify="right")
    for i, (name, row) in enumerate(zip(classes, matrix, strict=True)):
        table.add_row(Text(name), *(Text(str(v), style="bold" if i == j else "dim" if not v else "")
                                    for j, v in enumerate(row)))
    return table


def predictions_table(result, top_k: int, coverage: float | None = None) -> Table:
    """One row an image; the prediction set (at *coverage*) and the OOD flag where the result has them."""
    rows = result.predictions
    first = rows[0] if rows else None
    sets = first is not None and first.prediction_set is not None
    flags = first is not None and first.ood is not None
    table = Table(title=f"predictions ({len(rows)} images)")
    columns = ("image", "label", "probability", f"top {top_k}", *([f"set ({coverage:g})"] if sets else []),
               *(["OOD"] if flags else []), *(first.uncertainty if first else ()))
    for column in columns:
        table.add_column(column, justify="left" if column in ("image", "label") else "right")
    for r in rows:
        table.add_row(Text(str(r.path)), Text(r.label), f"{r.probability:.3f}",
                      Text(", ".join(f"{c} {p:.2f}" for c, p in r.top_k)),
                      *([Text("{" + ", ".join(r.prediction_set) + "}")] if sets else []),
                      *([_flag(r.ood)] if flags else []),
                      *(f"{v:.3f}" for v in r.uncertainty.values()))
    return table


def _flag(ood: bool) -> Text:
    return Text("yes", style="bold red") if ood else Text("no", style="dim")


def comparison_table(result) -> Table:
    sizes = result.sizes
    table = Table(title=f"test set: {sizes['test']} images (train {sizes['train']}, val "
                        f"{sizes['val']}); best of each column in bold green",
                  caption="F1: macro-F1; cov@.9, set: coverage and mean size of 90 % conformal prediction "
                          "sets; fit s excludes the shared feature extraction; ms/img: "
                          "prediction (feature heads: the head alone, the backbone's cost is in the "
                          "notes; pixel heads: end to end); MB: model folder")
    table.add_column("head", no_wrap=True)
    for title, _ in COLUMN_TITLES.values():
        table.add_column(title, justify="right")
    best = result.best()
    for row in result.rows:
        if row.status != "ok":
            table.add_row(row.head, "[red]failed[/]", *[""] * (len(COLUMN_TITLES) - 1))
            continue
        table.add_row(row.head, *(Text("–" if row.metrics[c] is None else f"{row.metrics[c]:{fmt}}",
                                       style="bold green" if best.get(c) == row.head else "")
                                  for c, (_, fmt) in COLUMN_TITLES.items()))
    return table


def trials_table(result) -> Table:
    names = sorted({k for r in result.trials for k in r.params})
    table = Table(title=f"{len(result.trials)} trials of {result.head} (best in bold green)")
    for column in ("trial", *names, "val NLL", "val acc", "seconds"):
        table.add_column(column, justify="right")
    for r in result.trials:
        scores = ((f"{r.val_nll:.4f}", f"{r.val_accuracy:.3f}") if r.error is None
                  else (Text("failed", style="red"), Text(r.error[:40])))
        table.add_row(str(r.number), *(Text(_cell(r.params.get(k))) for k in names), *scores,
                      f"{r.seconds:.1f}",
                      style="bold green" if r.number == result.best.number else None)
    return table


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def backbone_line(item) -> Text:
    """``name  weights`` on one line (greppable): where weights are found locally, or whether published."""
    weights = (f"here: {item.local.split(' /')[0]}" if item.local else "published" if item.published
               else "no published weights")
    return Text.assemble((f"{item.name:<36} ", ""), (weights, "green" if item.local else "dim"))
