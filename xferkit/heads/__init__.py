"""Head registry: the ``--head`` names, ``compare``'s list and ``tune``'s spaces all come from here."""

from __future__ import annotations

from enum import Enum
from importlib import import_module

from xferkit.errors import XferkitError
from xferkit.heads.base import Head

#: head name -> "module:Class"; a new head is one module plus one line here.
_HEADS = {
    "lr": "xferkit.heads.lr:LogisticHead",
    "finetune": "xferkit.heads.finetune:FinetuneHead",
    "scratch": "xferkit.heads.scratch:ScratchHead",
    "gp": "xferkit.heads.gp:GPHead",
    "bnn": "xferkit.heads.bnn:BNNHead",
}


#: The ``--head`` choices as a str Enum (typer shows them in --help).
HeadName = Enum("HeadName", {name: name for name in _HEADS}, type=str)


def head_names() -> list[str]:
    return list(_HEADS)


def get_head_class(name: str) -> type[Head]:
    if name not in _HEADS:
        raise XferkitError(f"unknown head {name!r}; choose one of {', '.join(_HEADS)}.")
    module, cls = _HEADS[name].split(":")
    return getattr(import_module(module), cls)


def create_head(name: str, **params) -> Head:
    """A head by name; ``None`` values mean "use the head's default"."""
    cls = get_head_class(name)
    given = {k: v for k, v in params.items() if v is not None}
    accepted = cls._get_param_names()
    foreign = sorted(set(given) - set(accepted))
    if foreign:
        options = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise XferkitError(f"the {name} head does not take {options} "
                           f"(its hyper-parameters: {', '.join(accepted) or 'none'}).")
    return cls(**given)


__all__ = ["Head", "HeadName", "create_head", "get_head_class", "head_names"]
