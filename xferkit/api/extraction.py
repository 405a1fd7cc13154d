"""``extract``: backbone features of a labelled folder, saved to one safetensors file for use elsewhere."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from xferkit.api.results import skipped_json
from xferkit.backbones import create_backbone
from xferkit.core.distributed import is_main
from xferkit.core.reporting import SILENT, Reporter
from xferkit.features import Features, extract_features
from xferkit.io.data import read_image_folder
from xferkit.io.files import atomic_write_bytes, check_output_file
from xferkit.model.options import BackboneOptions, ExtractOptions


def is_feature_file(path: Path) -> bool:
    """Whether *path* is a safetensors file that ``extract`` wrote (its metadata says so)."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {"backbone", "classes", "paths"} <= set(f.metadata() or {})
    except (OSError, SafetensorError):
        return False


@dataclass
class ExtractResult:
    """Where the features went, what they are, and which files were skipped."""

    output: Path
    features: Features
    classes: list[str]

    def to_json(self) -> dict:
        return {"output": str(self.output), "n": int(len(self.features.kept)),
                "dim": int(self.features.features.shape[1]), "classes": self.classes,
                "skipped": skipped_json(self.features.skipped)}


def extract(data: str | Path, output: str | Path, *, backbone: BackboneOptions | str = BackboneOptions(),
            options: ExtractOptions = ExtractOptions(), force: bool = False,
            reporter: Reporter = SILENT) -> ExtractResult:
    """Save ``features``, ``labels`` (and, in the metadata, classes, paths and the backbone) of *data*."""
    backbone = BackboneOptions(backbone) if isinstance(backbone, str) else backbone
    output = Path(output)
    check_output_file(output, force, is_feature_file, "a features file")
    images = read_image_folder(data)
    net = create_backbone(backbone.name, backbone.weights, backbone.pretrained, backbone.layer,
                          backbone.image_size, reporter)
    feats = extract_features(net, images.paths, device=options.device, batch_size=options.batch_size,
                             workers=options.workers, cache=options.cache, strict=options.strict,
                             reporter=reporter)
    metadata = {"backbone": json.dumps(net.spec()), "classes": json.dumps(images.classes),
                "paths": json.dumps([str(images.paths[i]) for i in feats.kept])}
    if is_main():  # under torchrun every rank has the features; one writes them
        atomic_write_bytes(output, safetensors_bytes({"features": feats.features,
                                                     "labels": images.labels[feats.kept]}, metadata))
    return ExtractResult(output, feats, images.classes)
