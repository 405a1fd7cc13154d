"""Predict from an exported ONNX file with onnxruntime, decoding and resizing images as xferkit does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xferkit.core.devices import resolve_device
from xferkit.core.metrics import predictive_entropy
from xferkit.core.reporting import SILENT, Reporter
from xferkit.features import refuse_skipped
from xferkit.features.loader import image_loader
from xferkit.model.models import Predictions
from xferkit.model.onnx.metadata import INPUT, OUTPUT, ExportMetadata, optional, read_props, session
from xferkit.model.options import ExtractOptions

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class OnnxModel:
    """An ONNX file ``xferkit export`` wrote: predicts like a loaded model folder, through onnxruntime.

    Only the entropy is reported as uncertainty: the graph's one output is the probabilities.
    """

    kind = "onnx"

    def __init__(self, path: Path, metadata: ExportMetadata):
        self.path, self.metadata = Path(path), metadata
        self.classes, self.head = list(metadata.classes), metadata.head
        self.calibration, self.metrics = None, {}  # the temperature is inside the graph
        self.held_out = None  # probabilities only: no held-out scores for sets or OOD flags
        self.info = {"data": metadata.data} if metadata.data else {}
        self._sessions: dict[tuple[str, ...], object] = {}

    @classmethod
    def load(cls, path: str | Path) -> OnnxModel:
        """The exported model in *path*; an ONNX file without xferkit's metadata is refused."""
        path = Path(path)
        return cls(path, ExportMetadata.from_props(read_props(path), path))

    def providers(self, device: str) -> list[str]:
        """onnxruntime's CUDA provider where *device* is a GPU and it has one, else the CPU."""
        available = optional("onnxruntime").get_available_providers()
        cuda = resolve_device(device).type == "cuda" and CUDA in available
        return [CUDA, CPU] if cuda else [CPU]

    def predict(self, paths: list[Path], options: ExtractOptions = ExtractOptions(),
                reporter: Reporter = SILENT) -> Predictions:
        """Calibrated probabilities (and their entropy) of the images that decode, in input order."""
        paths = [Path(p) for p in paths]
        providers = tuple(self.providers(options.device))
        if providers not in self._sessions:
            self._sessions[providers] = session(self.path, list(providers))
        run = self._sessions[providers].run
        rows, kept, failures = [], [], {}
        loader = image_loader(paths, self.metadata.preprocess, torch.device("cpu"), options.batch_size,
                              options.workers)
        with reporter.task(f"predicting with {self.path.name}", len(paths)) as task:
            for index, images, failed in loader:
                failures.update(failed)
                if len(index):
                    rows.append(run([OUTPUT], {INPUT: images.numpy()})[0])
                    kept += index.tolist()
                task.advance(len(index) + len(failed))
        skipped = [(paths[i], failures[i]) for i in sorted(failures)]
        if options.strict:
            refuse_skipped(skipped)
        proba = np.concatenate(rows) if rows else np.zeros((0, len(self.classes)), np.float32)
        return Predictions(proba, {"entropy": predictive_entropy(proba)}, np.array(kept, np.int64), skipped)
