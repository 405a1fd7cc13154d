"""The ``--head`` names and their hyper-parameters: one registry for repurpose, compare and tune.

A head's hyper-parameters (names, defaults, types and one-line help) are read from its class's
source with ``ast`` -- the keywords of ``__init__`` and the numpydoc "Parameters" section -- so the
CLI can declare and document them without importing torch; a test checks them against
``get_params()``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from dataclasses import dataclass
from enum import Enum
from importlib import import_module
from pathlib import Path

from xferkit.core.errors import InvalidParameter, XferkitError
from xferkit.finetune import PIXEL_TRAINERS
from xferkit.heads import FEATURE_HEADS

#: Head name -> ("module:Class", what it learns from: backbone features, or pixels).
HEADS = {**{name: (target, "features") for name, target in FEATURE_HEADS.items()},
         **{name: (target, "pixels") for name, target in PIXEL_TRAINERS.items()}}
#: Parameters a run sets from its own options (backbone, device, seed...), not head options.
RUN_PARAMS = frozenset({"backbone", "weights", "pretrained", "layer", "image_size", "device", "batch_size",
                        "workers", "random_state"})

#: The ``--head`` choices as a str Enum (typer shows them in --help).
HeadName = Enum("HeadName", {name: name for name in HEADS}, type=str)


def head_names() -> list[str]:
    return list(HEADS)


def _target(name: str) -> tuple[str, str]:
    if name not in HEADS:
        raise XferkitError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}.")
    module, cls = HEADS[name][0].split(":")
    return module, cls


def head_kind(name: str) -> str:
    """``"features"`` for heads on backbone features, ``"pixels"`` for networks trained on images."""
    _target(name)
    return HEADS[name][1]


def head_class(name: str) -> type:
    module, cls = _target(name)
    return getattr(import_module(module), cls)


def create_head(name: str, **params):
    """A head (or pixel trainer) by name; a parameter it does not take is a clear error."""
    declared = head_params(name)
    foreign = sorted(set(params) - set(declared))
    if foreign:
        raise InvalidParameter(f"the {name} head has no parameter {', '.join(foreign)} "
                               f"(it takes: {', '.join(options_of(name))}).")
    return head_class(name)(**params)


@dataclass(frozen=True)
class HeadParam:
    """One hyper-parameter as declared in the head's source."""

    name: str
    default: object
    annotation: str
    help: str

    def parse(self, text: str):
        """*text* (from the command line) as a value of this parameter's type."""
        kinds = set(re.findall(r"\w+", self.annotation))
        if text.strip().lower() == "none" and ("None" in kinds or self.default is None):
            return None
        if "bool" in kinds:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
        for kind in (int, float):
            if kind.__name__ in kinds:
                try:
                    return kind(text)
                except ValueError:
                    pass
        if "str" in kinds:
            return text
        raise InvalidParameter(f"{self.name}={text!r} is not a valid {self.annotation}.")


@functools.cache
def head_params(name: str) -> dict[str, HeadParam]:
    """Every keyword of the head's ``__init__``, in order, with default, type and help."""
    module, cls = _target(name)
    source = Path(importlib.util.find_spec(module).origin).read_text()
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = init.args.args[1:] + init.args.kwonlyargs
    defaults = [*init.args.defaults, *init.args.kw_defaults]
    helps = _numpydoc_parameters(ast.get_docstring(node) or "")
    return {arg.arg: HeadParam(arg.arg, ast.literal_eval(default),
                               ast.unparse(arg.annotation) if arg.annotation else "",
                               helps.get(arg.arg, ""))
            for arg, default in zip(args, defaults[-len(args):], strict=True)}


def options_of(name: str) -> dict[str, HeadParam]:
    """The hyper-parameters a user sets for this head (``--set HEAD.PARAM=VALUE``)."""
    return {k: p for k, p in head_params(name).items() if k not in RUN_PARAMS}


def _numpydoc_parameters(doc: str) -> dict[str, str]:
    """``{name: first line of description}`` from a numpydoc "Parameters" section."""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines[:-1])
                     if line.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"}) + 2
    except StopIteration:
        return {}
    found, current = {}, None
    for line in lines[start:]:
        if line.strip() and set(line.strip()) == {"-"}:  # the next section's underline
            break
        match = re.match(r"^(\w+)\s*:", line)
        if match:
            current = match.group(1)
            found[current] = ""
        elif current and line.strip() and not found[current]:
            found[current] = line.strip()
    return found


def parse_settings(items: list[str], head: str | None = None) -> dict[str, dict]:
    """``["finetune.epochs=2", "C=0.5"]`` as ``{head: {param: value}}``, each value of the parameter's type.

    ``PARAM=VALUE`` without a head means *head* (the one repurpose or tune runs).
    """
    settings: dict[str, dict] = {}
    for item in items:
        key, sep, text = item.partition("=")
        name, dot, param = key.strip().rpartition(".")
        name = name if dot else head
        if not (sep and param and name):
            raise InvalidParameter(f"--set takes HEAD.PARAM=VALUE (e.g. finetune.epochs=2), got {item!r}.")
        options = options_of(name)
        if param not in options:
            raise InvalidParameter(f"the {name} head has no parameter {param!r}; it takes: "
                                   f"{', '.join(options)}.")
        settings.setdefault(name, {})[param] = options[param].parse(text.strip())
    return settings
