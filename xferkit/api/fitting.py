"""``repurpose``: extract features of labelled images once, fit a head on them, save the model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from xferkit.api.results import skipped_json
from xferkit.core.distributed import is_main
from xferkit.core.reporting import SILENT, Reporter
from xferkit.io.data import Splits, load_splits
from xferkit.io.files import check_output_folder
from xferkit.model.models import TransferModel, fit_model
from xferkit.model.options import BackboneOptions, ExtractOptions, SplitOptions
from xferkit.model.registry import create_head


@dataclass
class RepurposeResult:
    """The fitted model, where it was saved, the files skipped, and notes on the split."""

    model: TransferModel
    output: Path | None
    skipped: list[tuple[Path, str]]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        model = self.model
        return {"output": str(self.output) if self.output else None, "backbone": model.backbone_spec,
                "classes": model.classes, "head": model.head,
                "head_params": model.manifest().head_params, "validation_metrics": model.metrics,
                "calibration": model.calibration.to_json() if model.calibration else None,
                "held_out": ({k: v for k, v in model.held_out.to_json().items() if not k.endswith("_scores")}
                             if model.held_out else None),
                "info": model.info, "seconds": round(self.seconds, 2), "skipped": skipped_json(self.skipped)}


def repurpose(data: str | Path, *, backbone: BackboneOptions | str = BackboneOptions(), head: str = "lr",
              params: dict | None = None, output: str | Path | None = None,
              val_split: float = SplitOptions.val_split, seed: int = SplitOptions.seed,
              calibrate: bool = True, force: bool = False, options: ExtractOptions = ExtractOptions(),
              splits: Splits | None = None, folds: int = 0, reporter: Reporter = SILENT) -> RepurposeResult:
    """Fit *head* on the training images of *data* and save the model to *output* (when given).

    The validation split (the data's ``val/``, or ``val_split`` of each class, seeded) calibrates
    the probabilities (``calibrate``), gives the validation metrics and the held-out scores of
    prediction sets and OOD flags. ``splits`` replaces the split of *data* (compare and tune hold
    out their own); ``folds`` > 1 (feature heads, no validation split) takes all those from
    out-of-fold predictions of the training images instead.
    """
    started = time.perf_counter()
    backbone = BackboneOptions(backbone) if isinstance(backbone, str) else backbone
    if output is not None:
        check_output_folder(Path(output), force)
    create_head(head, **(params or {}))  # an unknown head or parameter fails before any work
    if splits is None:  # a split made here is announced here (compare and tune announce their own)
        splits = load_splits(data, val_split, seed)
        for note in splits.notes:
            reporter.note(note)
    model, fitted = fit_model(head, params, backbone=backbone, train=splits.train, val=splits.val,
                              options=options, seed=seed, calibrated=calibrate,
                              info={"data": str(Path(data).resolve()), "val_split": val_split},
                              reporter=reporter, folds=folds)
    if output is not None and is_main():  # under torchrun every rank has the model; one saves it
        model.save(output, force=force)
    return RepurposeResult(model, Path(output) if output is not None else None, fitted.skipped, splits.notes,
                           time.perf_counter() - started)
