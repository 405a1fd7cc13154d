"""Build one torch graph of a model (uint8 images to calibrated probabilities) and export it to ONNX.

The graph normalises as :class:`xferkit.preprocess.Normalizer` does, runs the backbone and the
head's torch module (the head's own, closest to its ``predict_proba`` when it offers several),
and applies the calibration temperature. Resizing and cropping stay outside: the file's metadata
says how (see :mod:`xferkit.model.onnx.metadata`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from xferkit.core.errors import XferkitError
from xferkit.core.version import __version__
from xferkit.heads.exportable import tempered
from xferkit.model.models import FeatureModel, TransferModel
from xferkit.model.onnx.metadata import INPUT, OUTPUT, ExportMetadata, optional
from xferkit.preprocess import Preprocess

#: Opset of the TorchScript exporter, the fallback (the dynamo exporter picks its own).
OPSET = 18
#: ``exporter`` choices: auto tries the dynamo-based exporter and falls back to the TorchScript-based one.
EXPORTERS = ("auto", "dynamo", "torchscript")
#: Random standardised feature rows on which a head's torch modules are compared with ``predict_proba``.
PROBE_ROWS = 64


class ProbabilityGraph(nn.Module):
    """uint8 ``(N, 3, H, W)`` images to ``(N, classes)`` probabilities: normalise, network, temperature."""

    def __init__(self, network: nn.Module, preprocess: Preprocess, temperature: float):
        super().__init__()
        std, mean = (torch.tensor(v).view(1, 3, 1, 1) for v in (preprocess.std, preprocess.mean))
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", mean / std)
        self.network, self.temperature = network, float(temperature)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return tempered(self.network(image.float() * self.scale - self.shift), self.temperature)


@dataclass
class Exported:
    """The ONNX file's bytes, its metadata, each head method's error and the file's own check."""

    data: bytes
    metadata: ExportMetadata
    head_errors: dict[str, float]
    max_abs_diff: float


def export_onnx(model: TransferModel, exporter: str = "auto") -> Exported:
    """*model* as ONNX bytes with metadata, checked by ``onnx.checker`` and against torch in onnxruntime.

    *exporter* is one of :data:`EXPORTERS`.
    """
    onnx = optional("onnx")
    spec = model.backbone_spec
    preprocess = Preprocess.from_json(spec["preprocess"])
    network, method, errors = _network(model)
    graph = ProbabilityGraph(network, preprocess, model.calibration.temperature if model.calibration else 1.0)
    proto, exporter = _to_onnx(graph.eval(), _images(2, preprocess, seed=0), exporter)
    metadata = ExportMetadata(model.classes, preprocess, spec["name"], spec["weights_digest"], model.head,
                              method, graph.temperature, exporter, __version__, model.info.get("data"))
    onnx.helper.set_model_props(proto, metadata.to_props())
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise XferkitError(f"the exported graph does not pass onnx.checker ({str(err)[:300]}).") from None
    data = proto.SerializeToString()
    return Exported(data, metadata, errors, _check(data, graph, preprocess))


def _network(model: TransferModel) -> tuple[nn.Module, str, dict[str, float]]:
    """Normalised images to probabilities; the head method used; every method's error on probe rows."""
    modules = model.estimator.torch_modules()
    if not isinstance(model, FeatureModel):
        method, network = next(iter(modules.items()))
        return network, method, {}
    head = model.estimator
    rng = np.random.default_rng(0)
    probe = (head.mean_ + head.scale_ * rng.standard_normal((PROBE_ROWS, len(head.mean_)))).astype(np.float32)
    want = head.predict_proba(probe)
    with torch.no_grad():
        errors = {name: float(np.abs(module(torch.from_numpy(probe)).numpy() - want).max())
                  for name, module in modules.items()}
    method = min(errors, key=errors.get)
    return nn.Sequential(model.backbone.model, modules[method]), method, errors


def _images(n: int, preprocess: Preprocess, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *preprocess.input_size), dtype=torch.uint8, generator=generator)


def _to_onnx(graph: nn.Module, example: torch.Tensor, exporter: str):
    """``(ModelProto, exporter used)``: the dynamo-based exporter, else (or if asked) the TorchScript one."""
    names = {"input_names": [INPUT], "output_names": [OUTPUT]}
    failures = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' notes are for torch developers, not users
        if exporter in ("auto", "dynamo"):
            try:
                program = torch.onnx.export(graph, (example,), dynamo=True, verbose=False, **names,
                                            dynamic_shapes={INPUT: {0: torch.export.Dim("batch", min=1)}})
                return program.model_proto, "dynamo"
            except Exception as err:  # any failure of the newer exporter: the older one may work
                failures.append(f"dynamo: {type(err).__name__}: {str(err)[:200]}")
        if exporter in ("auto", "torchscript"):
            buffer = io.BytesIO()
            try:
                torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=OPSET, **names,
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
                return optional("onnx").load_from_string(buffer.getvalue()), "torchscript"
            except Exception as err:
                failures.append(f"torchscript: {type(err).__name__}: {str(err)[:200]}")
    raise XferkitError(f"torch cannot export this model to ONNX ({'; '.join(failures)}).")


def _check(data: bytes, graph: nn.Module, preprocess: Preprocess) -> float:
    """Largest difference between onnxruntime and torch on random images (another batch size than export)."""
    ort = optional("onnxruntime")
    images = _images(3, preprocess, seed=1)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = graph(images).numpy()
    return float(np.abs(session.run([OUTPUT], {INPUT: images.numpy()})[0] - want).max())
