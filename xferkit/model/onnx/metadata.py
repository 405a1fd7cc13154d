"""What an exported ONNX file records in ``metadata_props``: classes, preprocessing and provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from types import ModuleType

from xferkit.core.errors import XferkitError
from xferkit.preprocess import Preprocess

#: The metadata key that marks a file xferkit exported, and the version of what the keys hold.
FORMAT_KEY, FORMAT = "xferkit.format", "1"
#: The graph's input and output names.
INPUT, OUTPUT = "image", "probabilities"
EXTRA = "pip install 'xferkit[export]'"


def optional(module: str) -> ModuleType:
    """Import *module* of the ``export`` extra, or say how to install it."""
    try:
        return import_module(module)
    except ImportError:
        raise XferkitError(f"ONNX export and prediction need the {module} package: {EXTRA}") from None


@dataclass(frozen=True)
class ExportMetadata:
    """The model behind an ONNX file: class names in column order, how images are prepared, provenance."""

    classes: list[str]
    preprocess: Preprocess
    backbone: str
    weights_digest: str
    head: str
    head_method: str
    temperature: float
    exporter: str
    xferkit_version: str
    data: str | None = None

    def to_props(self) -> dict[str, str]:
        """String key/value pairs for ``metadata_props`` (JSON where a value is not a plain string)."""
        recipe = {**self.preprocess.to_json(), "resize_size": self.preprocess.resize_size,
                  "steps": "resize the shorter side to resize_size, centre-crop input_size, uint8 NCHW RGB"}
        return {FORMAT_KEY: FORMAT, "xferkit.version": self.xferkit_version,
                "xferkit.classes": json.dumps(self.classes),
                "xferkit.input_size": json.dumps(list(self.preprocess.input_size)),
                "xferkit.preprocess": json.dumps(recipe), "xferkit.backbone": self.backbone,
                "xferkit.weights_digest": self.weights_digest, "xferkit.head": self.head,
                "xferkit.head_method": self.head_method, "xferkit.temperature": repr(self.temperature),
                "xferkit.exporter": self.exporter, "xferkit.data": json.dumps(self.data)}

    @classmethod
    def from_props(cls, props: dict[str, str], path: Path) -> ExportMetadata:
        """The metadata of the file *path*; one that xferkit did not export is refused."""
        if props.get(FORMAT_KEY) != FORMAT:
            found = f"format {props[FORMAT_KEY]!r}" if FORMAT_KEY in props else "no xferkit metadata"
            raise XferkitError(f"{path} is not an ONNX file that `xferkit export` wrote ({found}): xferkit "
                               "cannot know its classes or preprocessing. Export the model folder with "
                               "`xferkit export MODEL -o FILE.onnx`.")
        try:
            recipe = json.loads(props["xferkit.preprocess"])
            return cls(json.loads(props["xferkit.classes"]), Preprocess.from_json(recipe),
                       props["xferkit.backbone"], props["xferkit.weights_digest"], props["xferkit.head"],
                       props["xferkit.head_method"], float(props["xferkit.temperature"]),
                       props["xferkit.exporter"], props["xferkit.version"], json.loads(props["xferkit.data"]))
        except (KeyError, TypeError, ValueError) as err:
            raise XferkitError(f"{path}: its xferkit metadata is damaged ({type(err).__name__}: {err}); "
                               "export the model again.") from None


def read_props(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of ONNX file *path* (read by onnxruntime, which also checks the graph)."""
    return session(path, ["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map


def session(path: Path, providers: list[str]):
    """An onnxruntime session of *path*; a missing or unreadable file is one clear error."""
    ort = optional("onnxruntime")
    if not Path(path).is_file():
        raise XferkitError(f"{path}: no such ONNX file. Write one with `xferkit export MODEL -o {path}`.")
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as err:  # onnxruntime's own exception classes (Fail, InvalidProtobuf, ...)
        raise XferkitError(f"{path} is not an ONNX model onnxruntime can load ({str(err)[:200]}).") from None


def is_xferkit_onnx(path: Path) -> bool:
    """Whether *path* is an ONNX file that ``xferkit export`` wrote (what ``--force`` may replace)."""
    try:
        return read_props(path).get(FORMAT_KEY) == FORMAT
    except XferkitError:
        return False
