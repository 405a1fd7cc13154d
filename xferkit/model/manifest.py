"""``model.json``: what a saved model is, checked against its schema before anything is built."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xferkit.core.errors import XferkitError
from xferkit.core.version import __version__
from xferkit.model.held_out import OOD_SCORE_NAMES

#: 2: heads are scikit-learn estimators (labels in JSON), pixel trainers apart, shared calibration;
#: later, an optional ``held_out`` record (conformal and OOD scores), absent from older folders.
FORMAT_VERSION = 2
MANIFEST = "model.json"
MODEL_KINDS = ("features", "pixels")
#: The torchvision interpolations xferkit can resize with (``InterpolationMode`` values).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "nearest-exact", "lanczos", "box", "hamming")
#: Input sizes the CLI accepts (``--image-size``), and centre-crop fractions: timm's and torchvision's
#: run from 0.875 to 1.15 (volo_*_448: the crop is larger than the resized image); at least 0.5 keeps
#: the resize within twice the largest input size.
INPUT_SIZES, CROP_PCTS = (8, 4096), (0.5, 2.0)
#: Pixel statistics on the [0, 1] scale: a std below one grey level of 8-bit images is not one.
MEANS, STDS = (0.0, 1.0), (1 / 255, 1.0)


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
    held_out: dict | None = None
    xferkit_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> dict:
        data = asdict(self)
        return {"format_version": FORMAT_VERSION, "xferkit_version": data.pop("xferkit_version"),
                "created": data.pop("created"), "kind": data.pop("kind"), "backbone": data.pop("backbone"),
                "classes": data.pop("classes"),
                "head": {"name": data.pop("head"), "params": data.pop("head_params")}, **data}


@dataclass(frozen=True)
class Value:
    """A leaf of the schema: the test a value must pass, and what it must be (for the message)."""

    must_be: str
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class Record:
    """A JSON object of exactly these keys (each a :class:`Value` or a nested record), or null if allowed.

    An ``optional`` record may be absent from its parent (added to the format later: older files lack it).
    """

    keys: dict[str, Value | Record]
    nullable: bool = False
    optional: bool = False


def _number(value: Any, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> bool:
    """A finite JSON number (not a boolean) in [low, high], or (low, high] when *low_open*."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value))  # a 400-digit int overflows isfinite
            and (low < value if low_open else low <= value) and value <= high)


def _integer(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """A JSON integer (not a boolean) in [low, high]."""
    return isinstance(value, int) and _number(value, low, high)


def _triple(value: Any, low: float, high: float) -> bool:
    """Three numbers in [low, high]: a per-channel (RGB) statistic."""
    return isinstance(value, list) and len(value) == 3 and all(_number(v, low, high) for v in value)


def _text(value: Any) -> bool:
    """A string without line breaks or control characters: messages quote it on one line."""
    return isinstance(value, str) and value.isprintable()


def _ascending(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """A non-empty list of numbers in [low, high], in ascending order."""
    return (isinstance(value, list) and len(value) > 0 and all(_number(v, low, high) for v in value)
            and all(a <= b for a, b in zip(value, value[1:], strict=False)))


def _json_scalar(value: Any) -> bool:
    """Such a string, a finite number, a boolean or null: what a hyper-parameter can be."""
    return value is None or isinstance(value, bool) or _text(value) or _number(value)


TEXT = Value("a string of printable characters", _text)
TEXT_OR_NULL = Value("a string of printable characters or null", lambda v: v is None or _text(v))
FINITE = Value("a finite number", _number)
OBJECT = Value("an object", lambda v: isinstance(v, dict))
SCHEMA = Record({
    "format_version": Value("an integer", _integer),
    "xferkit_version": TEXT,
    "created": TEXT,
    "kind": Value(" or ".join(map(repr, MODEL_KINDS)), lambda v: v in MODEL_KINDS),
    "backbone": Record({
        "name": TEXT,
        "weights_digest": Value("64 hexadecimal digits (a sha256)",
                                lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None),
        "weights_file": TEXT_OR_NULL,
        "weights_source": TEXT,
        "pretrained": Value("true or false", lambda v: isinstance(v, bool)),
        "layer": TEXT_OR_NULL,
        "preprocess": Record({
            "input_size": Value(f"two integers in [{INPUT_SIZES[0]}, {INPUT_SIZES[1]}]",
                                lambda v: isinstance(v, list) and len(v) == 2
                                and all(_integer(n, *INPUT_SIZES) for n in v)),
            "interpolation": Value(f"one of {', '.join(INTERPOLATIONS)}", lambda v: v in INTERPOLATIONS),
            "mean": Value(f"three numbers in [{MEANS[0]}, {MEANS[1]}]", lambda v: _triple(v, *MEANS)),
            "std": Value(f"three numbers in [1/255, {STDS[1]}]", lambda v: _triple(v, *STDS)),
            "crop_pct": Value(f"a number in [{CROP_PCTS[0]}, {CROP_PCTS[1]}]",
                              lambda v: _number(v, *CROP_PCTS)),
        }),
    }),
    "classes": Value("a non-empty list of distinct strings",
                     lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(c, str) for c in v)
                     and len(set(v)) == len(v)),
    "head": Record({
        "name": TEXT,
        "params": Value("an object of strings, numbers, booleans and nulls",
                        lambda v: isinstance(v, dict) and all(_json_scalar(p) for p in v.values())),
    }),
    "calibration": Record({
        "temperature": Value("a positive finite number", lambda v: _number(v, 0, low_open=True)),
        "n": Value("a non-negative integer", lambda v: _integer(v, 0)),
        **{key: FINITE for key in ("nll_before", "nll_after", "ece_before", "ece_after")},
    }, nullable=True),
    "held_out": Record({
        "source": TEXT,
        "n": Value("a positive integer", lambda v: _integer(v, 1)),
        "conformal_scores": Value("an ascending list of numbers in [0, 1]",
                                  lambda v: _ascending(v, 0.0, 1.0 + 1e-6)),
        "ood_score": Value(f"one of {', '.join(OOD_SCORE_NAMES)}", lambda v: v in OOD_SCORE_NAMES),
        "ood_scores": Value("an ascending list of finite numbers", _ascending),
    }, nullable=True, optional=True),
    "validation_metrics": OBJECT,
    "info": Value("an object (its data, where given, a string)",
                  lambda v: isinstance(v, dict) and isinstance(v.get("data", ""), str)),
})


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of *folder*, refusing anything that is not a model folder of this format."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise XferkitError(f"{folder} is not an xferkit model folder (no {MANIFEST}). "
                           "Pass the -o folder that `xferkit repurpose` wrote.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise damaged(path, f"cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise damaged(path, f"holds {_shown(data)}, not a model manifest (a JSON object)")
    version = data.get("format_version")
    if _integer(version) and version != FORMAT_VERSION:
        head, backbone = (_name_of(data.get(key), key.upper()) for key in ("head", "backbone"))
        raise XferkitError(f"{folder} was saved in model format {version}; this xferkit (version "
                           f"{__version__}) reads format {FORMAT_VERSION}. Re-create it with: xferkit "
                           f"repurpose --backbone {backbone} --head {head} DATA -o {folder} --force")
    _check(data, SCHEMA, path)
    head = data["head"]
    return Manifest(kind=data["kind"], backbone=data["backbone"], classes=data["classes"], head=head["name"],
                    head_params=head["params"], calibration=data["calibration"],
                    validation_metrics=data["validation_metrics"], info=data["info"],
                    held_out=_held_out(data.get("held_out"), path),
                    xferkit_version=data["xferkit_version"], created=data["created"])


def _held_out(record: dict | None, path: Path) -> dict | None:
    """The held-out record, its two score lists as long as it says."""
    if record is not None and not len(record["conformal_scores"]) == len(record["ood_scores"]) == record["n"]:
        raise damaged(path, f"held_out.n is {record['n']} but its score lists hold "
                            f"{len(record['conformal_scores'])} and {len(record['ood_scores'])} values")
    return record


def _check(value: Any, schema: Value | Record, path: Path, where: str = "") -> None:
    """Refuse *value* unless it fits *schema*: the first key missing, unknown or wrong is named."""
    if isinstance(schema, Value):
        if not schema.test(value):
            raise damaged(path, f"{where} must be {schema.must_be}, not {_shown(value)}")
        return
    if value is None and schema.nullable:
        return
    if not isinstance(value, dict):
        raise damaged(path, f"{where or 'the file'} must be a JSON object, not {_shown(value)}")
    prefix = f"{where}." if where else ""
    missing = [prefix + key for key, inner in schema.keys.items()
               if key not in value and not (isinstance(inner, Record) and inner.optional)]
    if missing:
        raise damaged(path, f"lacks {', '.join(missing)}")
    unknown = sorted(prefix + key for key in set(value) - set(schema.keys))
    if unknown:
        raise damaged(path, f"has unknown keys {', '.join(unknown)}")
    for key, inner in schema.keys.items():
        if key in value:
            _check(value[key], inner, path, prefix + key)


def damaged(path: Path, problem: str) -> XferkitError:
    """The error for a model folder's file that xferkit did not write so: the file, the problem, the fix."""
    return XferkitError(f"{path}: {problem}; the model folder is damaged: repurpose the model again.")


def _name_of(part: Any, placeholder: str) -> str:
    """The name in manifest *part* for the command that re-creates the model, if it is one word."""
    name = part.get("name") if isinstance(part, dict) else None
    return name if _text(name) and name and " " not in name else placeholder


def _shown(value: Any, limit: int = 40) -> str:
    """*value* as JSON, cut to *limit* characters: enough to recognise it in a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
