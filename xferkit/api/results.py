"""Small pieces every command's result shares: skipped files as JSON, default output names, JSON files."""

from __future__ import annotations

import json
from pathlib import Path

from xferkit.io.files import atomic_write_bytes
from xferkit.model.options import BackboneOptions


def skipped_json(skipped: list[tuple[Path, str]]) -> list[dict]:
    return [{"path": str(p), "reason": reason} for p, reason in skipped]


def default_output(backbone: BackboneOptions | str, head: str) -> Path:
    """``runs/BACKBONE-HEAD``: where repurpose saves when no output folder is given."""
    name = backbone if isinstance(backbone, str) else backbone.name
    return Path("runs") / f"{name.replace(':', '_').replace('/', '_')}-{head}"


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(Path(path), json.dumps(data, indent=2, default=str).encode())
