"""Which backbone, and how images go through it: the options every command shares, with their defaults.

Plain dataclasses (no torch): the CLI reads its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BackboneOptions:
    """Which backbone and weights: ``name`` (timm, or ``tv:`` torchvision) and where weights come from."""

    name: str = "resnet18"
    weights: Path | None = None
    pretrained: bool = True
    layer: str | None = None
    image_size: int | None = None


@dataclass(frozen=True)
class ExtractOptions:
    """How images go through a network: device, batching, decode workers, feature cache, strictness.

    ``cache``: ``True`` uses ``$XFERKIT_CACHE`` (default ``~/.cache/xferkit``), a path another
    folder, ``False`` none. ``strict`` makes the first unreadable image an error.
    """

    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    cache: bool | Path = True
    strict: bool = False


@dataclass(frozen=True)
class SplitOptions:
    """How labelled data is split when it has no ``val/`` (or, for compare, ``test/``) folder of its own."""

    val_split: float = 0.2
    test_split: float = 0.2
    seed: int = 0
