"""Checks of saved model files, shared by feature heads and pixel trainers (which the layers keep apart).

Each check raises :class:`Damaged`; :func:`blame` turns it into the one XferkitError that names the
file and what to do, so a damaged folder is a clear line, never a traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from sklearn.utils._param_validation import InvalidParameterError

from xferkit.core.errors import XferkitError


class Damaged(Exception):
    """Something in a saved model that ``save`` cannot have written; ``load`` names the file."""


def require(ok: bool, problem: str) -> None:
    """Raise :class:`Damaged` with *problem* unless *ok*: the one check every other one goes through."""
    if not ok:
        raise Damaged(problem)


def checked(validate: Callable, *args) -> None:
    """Run a scikit-learn parameter validation, its refusal a :class:`Damaged`."""
    try:
        validate(*args)
    except InvalidParameterError as err:
        raise Damaged(str(err)) from None


@contextmanager
def blame(path: Path) -> Iterator[None]:
    """Turn a :class:`Damaged` raised inside into the XferkitError that names *path* and what to do."""
    try:
        yield
    except Damaged as err:
        raise XferkitError(f"{path}: {str(err).rstrip('.')}; the model folder is damaged: "
                           "repurpose the model again.") from None


def read_json_object(path: Path) -> dict:
    """The JSON object in *path*."""
    require(path.is_file(), "no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise Damaged(f"cannot be read as JSON ({err})") from None
    require(isinstance(data, dict), f"holds a JSON {type(data).__name__}, not an object")
    return data


def read_safetensors(path: Path, load_file: Callable[[Path], dict]) -> dict:
    """What *load_file* (safetensors' numpy or torch one) reads from *path*; such a file runs no code."""
    require(path.is_file(), "no such file")
    try:
        return load_file(path)
    except (OSError, SafetensorError, TypeError, ValueError) as err:
        raise Damaged(f"is not a readable safetensors file ({err})") from None


def expect_keys(data: Any, keys, where: str = "") -> None:
    """*data* must be a JSON object with exactly *keys*."""
    what = f"{where} " if where else ""
    require(isinstance(data, dict), f"{what or 'the file '}must be a JSON object")
    missing, unknown = [k for k in keys if k not in data], sorted(set(data) - set(keys))
    require(not missing, f"{what}lacks {', '.join(missing)}")
    require(not unknown, f"{what}has unknown keys {', '.join(unknown)}")


def checked_classes(classes: Any, dtype: Any) -> np.ndarray:
    """The labels *classes* as an array of *dtype*: distinct JSON scalars that survive the conversion."""
    require(isinstance(classes, list) and len(classes) >= 2 and all(map(is_scalar, classes))
            and len({json.dumps(c) for c in classes}) == len(classes),
            "classes must be a list of at least two distinct labels")
    try:
        labels = np.array(classes, dtype=np.dtype(dtype))
    except (TypeError, ValueError, OverflowError) as err:
        raise Damaged(f"classes_dtype {dtype!r} cannot hold the classes ({err})") from None
    require(json.dumps([plain(c) for c in labels.tolist()]) == json.dumps(classes),
            f"the classes do not survive conversion to classes_dtype {dtype!r}")
    return labels


def is_scalar(value: Any) -> bool:
    """A JSON string, boolean, integer or finite number: what a label can be."""
    return isinstance(value, (str, bool, int)) or isinstance(value, float) and math.isfinite(value)


def plain(value: Any) -> Any:
    """A numpy scalar as the Python one JSON can hold; anything else as it is."""
    return value.item() if isinstance(value, np.generic) else value
