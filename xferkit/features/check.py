"""Find which images decode, before a network trains on their pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xferkit.core.devices import resolve_device
from xferkit.core.reporting import SILENT, Reporter
from xferkit.features.extract import refuse_skipped
from xferkit.features.loader import image_loader
from xferkit.preprocess import Preprocess

#: Any recipe will do to check that an image decodes: a small one keeps the check cheap (JPEG draft mode).
CHECK_PREPROCESS = Preprocess((64, 64), "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0)


def readable_images(paths: list[Path], *, device: str = "auto", batch_size: int = 64,
                    workers: int | None = None, strict: bool = False, reporter: Reporter = SILENT
                    ) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """Decode every image once: the indices of those that read, and the skipped ``(path, reason)``."""
    failures: dict[int, str] = {}
    loader = image_loader(paths, CHECK_PREPROCESS, resolve_device(device), batch_size, workers)
    with reporter.task("checking images", len(paths)) as task:
        for index, _, failed in loader:
            failures.update(failed)
            task.advance(len(index) + len(failed))
    skipped = [(paths[i], failures[i]) for i in sorted(failures)]
    if strict:
        refuse_skipped(skipped)
    return np.array([i for i in range(len(paths)) if i not in failures], dtype=np.int64), skipped
