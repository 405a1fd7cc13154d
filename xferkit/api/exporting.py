"""``export`` a model to one ONNX file that onnxruntime runs without xferkit (and ``predict`` reads back)."""

from __future__ import annotations

import errno
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from xferkit.api.evaluation import loaded
from xferkit.core.errors import XferkitError
from xferkit.core.reporting import SILENT, Reporter
from xferkit.io.files import atomic_write_bytes, check_output_file, write_error
from xferkit.model.models import TransferModel
from xferkit.model.onnx.graph import EXPORTERS, export_onnx
from xferkit.model.onnx.metadata import INPUT, OUTPUT, ExportMetadata, is_xferkit_onnx, optional


@dataclass
class ExportResult:
    """Where the ONNX file went, its size, what it holds and how closely it matches the model."""

    output: Path
    bytes: int
    metadata: ExportMetadata
    head_errors: dict[str, float]
    max_abs_diff: float
    seconds: float

    def to_json(self) -> dict:
        meta = self.metadata
        return {"output": str(self.output), "bytes": self.bytes, "input": INPUT, "output_name": OUTPUT,
                "input_size": list(meta.preprocess.input_size), "classes": meta.classes,
                "backbone": meta.backbone, "head": meta.head, "head_method": meta.head_method,
                "head_method_errors": self.head_errors, "temperature": meta.temperature,
                "exporter": meta.exporter, "onnxruntime_vs_torch_max_abs_diff": self.max_abs_diff,
                "seconds": round(self.seconds, 3)}


def export(model: str | Path | TransferModel, output: str | Path, *, force: bool = False,
           exporter: str = "auto", reporter: Reporter = SILENT) -> ExportResult:
    """Write *model* (or the model folder of that name) as an ONNX graph to *output* (``.onnx``).

    An existing *output* is replaced only with ``force``, and only if ``xferkit export`` wrote it.
    ``exporter``: torch's dynamo-based one, the TorchScript-based one, or ``auto`` (dynamo, else
    TorchScript).
    """
    started, output = time.perf_counter(), Path(output)
    if output.suffix.lower() != ".onnx":
        raise XferkitError(f"{output}: name the ONNX file to write with the .onnx suffix "
                           "(xferkit predict recognises exported models by it).")
    if exporter not in EXPORTERS:
        raise XferkitError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}.")
    for module in ("onnx", "onnxruntime"):
        optional(module)
    check_output_file(output, force, is_xferkit_onnx, "an ONNX file")
    _check_writable(output)
    model = loaded(model)
    if not isinstance(model, TransferModel):
        raise XferkitError(f"{model.path} is already an exported ONNX file; export the model folder.")
    what = f"exporting {model.head} on {model.backbone_spec['name']} to ONNX"
    with reporter.task(what, 1, "graph") as task:
        exported = export_onnx(model, exporter)
        task.advance()
    atomic_write_bytes(output, exported.data)
    return ExportResult(output, len(exported.data), exported.metadata, exported.head_errors,
                        exported.max_abs_diff, time.perf_counter() - started)


def _check_writable(output: Path) -> None:
    """Refuse an *output* that cannot be written before the (slow) export rather than after it."""
    folder = next(parent for parent in output.absolute().parents if parent.exists())
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise write_error(output, err) from None
