"""Safe writes: atomic (temporary file or folder, then rename), permissions from the umask, clear errors.

An overwrite replaces only what xferkit itself wrote: a model folder holding anything else, or a
file of the user's, is refused rather than deleted.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from xferkit.core.errors import XferkitError

#: The file that marks a folder as a model xferkit wrote, and everything xferkit writes into one.
MODEL_MARKER = "model.json"
MODEL_FILES = frozenset({"model.json", "head.json", "head.safetensors", "ood.safetensors"})
#: What to do about the write errors users meet.
ADVICE = {errno.ENOSPC: "the disk is full: free some space or write elsewhere",
          errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
          errno.EROFS: "the file system is read-only: write elsewhere",
          errno.EACCES: "permission denied: write to a folder you own",
          errno.EPERM: "permission denied: write to a folder you own",
          errno.ENAMETOOLONG: "the name is too long for this file system: choose a shorter one",
          errno.ENOTDIR: "a part of the path is a file, not a folder"}


class WriteError(XferkitError):
    """A file or folder could not be written; the message names it and what to do."""


def write_error(path: Path, err: OSError) -> WriteError:
    advice = ADVICE.get(err.errno, err.strerror or str(err))
    return WriteError(f"cannot write {path}: {advice} ({os.strerror(err.errno) if err.errno else err}).")


@functools.cache
def _umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside *path*, then rename it into place (mode from the umask)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_error(path, err) from None


def exists(path: Path) -> bool:
    """``path.exists()``, with a path the file system cannot even look up (a name too long) an error."""
    try:
        return Path(path).exists()
    except OSError as err:
        raise write_error(Path(path), err) from None


def check_output_folder(target: Path, force: bool, marker: str = MODEL_MARKER,
                        own: frozenset[str] | None = MODEL_FILES) -> None:
    """Refuse an existing, non-empty *target* unless ``force`` is given and xferkit wrote it.

    xferkit wrote it when *marker* is there and (where *own* is given) nothing but *own* is.
    """
    target = Path(target)
    if not exists(target) or target.is_dir() and not any(target.iterdir()):
        return
    if not force:
        raise XferkitError(f"{target} already exists. Pass --force to overwrite it, "
                           "or choose another output folder with -o.")
    if not (target / marker).is_file():
        raise XferkitError(f"{target} exists and is not a folder xferkit wrote (no {marker} in it): "
                           "--force only ever replaces xferkit's own output. Choose another folder with -o.")
    foreign = sorted(p.name for p in target.iterdir() if own is not None and p.name not in own)
    if foreign:
        raise XferkitError(f"{target} also holds {', '.join(foreign[:5])}, which xferkit did not write: "
                           "--force would delete them. Move them out, or choose another folder with -o.")


def check_output_file(path: Path, force: bool, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse an existing *path* unless ``force`` is given and it is *what* xferkit wrote (``ours``)."""
    path = Path(path)
    if not exists(path):
        return
    if path.is_dir():
        raise XferkitError(f"{path} is a folder; give the {what} file to write.")
    if not force:
        raise XferkitError(f"{path} already exists. Pass --force to overwrite it, or choose another file.")
    if not ours(path):
        raise XferkitError(f"{path} exists and is not {what} xferkit wrote: it is left as it is. "
                           "Choose another file.")


@contextmanager
def atomic_folder(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces *target* in one rename.

    An existing *target* is only replaced with ``force``, and only if xferkit wrote it; on any
    error the temporary folder is removed and *target* is untouched.
    """
    target = Path(target)
    check_output_folder(target, force)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name[:40]}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name[:40]}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as err:
        raise write_error(target, err) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
