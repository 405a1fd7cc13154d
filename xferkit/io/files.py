"""Atomic file and folder writes: an interrupted run never leaves a half-written model."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xferkit.core.errors import XferkitError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside *path*, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: The file that marks a folder as a model xferkit wrote (only such a folder is ever replaced).
MODEL_MARKER = "model.json"


def check_output_folder(target: Path, force: bool, marker: str = MODEL_MARKER) -> None:
    """Refuse an existing *target* unless ``force`` is given and xferkit wrote it (*marker* is there)."""
    target = Path(target)
    if not target.exists():
        return
    if not force:
        raise XferkitError(f"{target} already exists. Pass --force to overwrite it, "
                           "or choose another output folder with -o.")
    if not (target / marker).is_file():
        raise XferkitError(f"{target} exists and is not a folder xferkit wrote (no {marker} in it): "
                           "--force only ever replaces xferkit's own output. Choose another folder with -o.")


@contextmanager
def atomic_folder(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces *target* in one rename.

    An existing *target* is only replaced with ``force``, and only if xferkit wrote it; on any
    error the temporary folder is removed and *target* is untouched.
    """
    target = Path(target)
    check_output_folder(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
