"""A repurposed model: backbone reference + head + class names, saved as JSON and safetensors."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xferkit import __version__
from xferkit.artifacts import atomic_folder
from xferkit.backbones import Backbone, Preprocess, create_backbone
from xferkit.errors import XferkitError
from xferkit.features import Features, extract_features
from xferkit.heads import Head

FORMAT_VERSION = 1


@dataclass
class TransferModel:
    """What ``repurpose`` produces and ``evaluate``/``predict`` use."""

    backbone: Backbone
    head: Head
    classes: list[str]
    metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def save(self, folder: str | Path, force: bool = False) -> Path:
        """Write the model folder atomically; an existing folder needs ``force``."""
        with atomic_folder(Path(folder), force=force) as tmp:
            self.head.save(tmp)
            (tmp / "model.json").write_text(json.dumps(self.manifest(), indent=2))
        return Path(folder)

    def manifest(self) -> dict:
        return {"format_version": FORMAT_VERSION, "xferkit_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "backbone": self.backbone.spec(), "classes": self.classes,
                "head": {"name": self.head.name, "params": self.head.get_params()},
                "validation_metrics": self.metrics, "info": self.info}

    @classmethod
    def load(cls, folder: str | Path) -> TransferModel:
        """Rebuild the backbone exactly as trained (digest-checked) and load the head."""
        folder = Path(folder)
        manifest_path = folder / "model.json"
        if not manifest_path.is_file():
            raise XferkitError(f"{folder} is not an xferkit model folder (no model.json). "
                               "Pass the -o folder that `xferkit repurpose` wrote.")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise XferkitError(f"{folder} has model format {manifest.get('format_version')}; "
                               f"this xferkit reads format {FORMAT_VERSION}.")
        spec = manifest["backbone"]
        backbone = create_backbone(spec["name"], weights=spec["weights_file"],
                                   pretrained=spec["pretrained"], layer=spec["layer"])
        if backbone.weights_digest != spec["weights_digest"]:
            raise XferkitError(
                f"the weights found for {spec['name']} ({backbone.weights_source}) are not the ones "
                f"this model was trained on (digest {backbone.weights_digest[:12]} here, "
                f"{spec['weights_digest'][:12]} recorded). Restore the original weights file.")
        backbone.preprocess = Preprocess.from_json(spec["preprocess"])
        head = Head.load(folder)
        if head.input_kind == "images":  # image heads rebuild their network from the backbone
            head.attach(backbone)
        return cls(backbone, head, manifest["classes"], manifest.get("validation_metrics", {}),
                   manifest.get("info", {}))

    def predict_proba(self, paths: list[Path], **extract_options) -> tuple[np.ndarray, Features]:
        """Probabilities for the images that decoded; ``Features.kept``/``skipped`` say which."""
        if self.head.input_kind == "images":
            return self.head.predict_images(paths, **extract_options)
        feats = extract_features(self.backbone, paths, **extract_options)
        proba = self.head.predict_proba(feats.features) if len(feats.kept) else np.zeros(
            (0, len(self.classes)))
        return proba, feats

