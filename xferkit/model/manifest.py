"""``model.json``: what a saved model is, checked against its schema before anything is built."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xferkit.core.errors import XferkitError
from xferkit.core.version import __version__

#: 2: heads are scikit-learn estimators (labels in JSON), pixel trainers apart, shared calibration.
FORMAT_VERSION = 2
MANIFEST = "model.json"


@dataclass(frozen=True)
class Manifest:
    """The manifest of a model folder (``model.json``)."""

    kind: str
    backbone: dict
    classes: list[str]
    head: str
    head_params: dict
    calibration: dict | None = None
    validation_metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    xferkit_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> dict:
        data = asdict(self)
        return {"format_version": FORMAT_VERSION, "xferkit_version": data.pop("xferkit_version"),
                "created": data.pop("created"), "kind": data.pop("kind"), "backbone": data.pop("backbone"),
                "classes": data.pop("classes"),
                "head": {"name": data.pop("head"), "params": data.pop("head_params")}, **data}


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of *folder*, refusing anything that is not a model folder of this format."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise XferkitError(f"{folder} is not an xferkit model folder (no {MANIFEST}). "
                           "Pass the -o folder that `xferkit repurpose` wrote.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise XferkitError(f"{path} cannot be read ({err}); the model folder is damaged: "
                           "repurpose the model again.") from None
    if not isinstance(data, dict):
        raise XferkitError(f"{path} is not a model manifest (a JSON object); repurpose the model again.")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        head = (data.get("head") or {}).get("name", "HEAD") if isinstance(data.get("head"), dict) else "HEAD"
        backbone = (data.get("backbone") or {}).get("name", "BACKBONE") \
            if isinstance(data.get("backbone"), dict) else "BACKBONE"
        raise XferkitError(f"{folder} was saved in model format {version}; this xferkit (version "
                           f"{__version__}) reads format {FORMAT_VERSION}. Re-create it with: xferkit "
                           f"repurpose --backbone {backbone} --head {head} DATA -o {folder} --force")
    try:
        head = data["head"]
        return Manifest(kind=data["kind"], backbone=data["backbone"], classes=data["classes"],
                        head=head["name"], head_params=head["params"], calibration=data.get("calibration"),
                        validation_metrics=data.get("validation_metrics", {}), info=data.get("info", {}),
                        xferkit_version=data.get("xferkit_version", ""), created=data.get("created", ""))
    except (KeyError, TypeError) as err:
        raise XferkitError(f"{path} lacks {err} or has the wrong type there; the model folder is damaged: "
                           "repurpose the model again.") from None
