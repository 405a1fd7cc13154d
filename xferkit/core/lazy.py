"""Package namespaces that import their exports on first use, so ``--help`` need not load torch."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A PEP 562 module ``__getattr__``: ``exports`` maps each public name to ``"module:attribute"``."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = exports[name].partition(":")
        return getattr(import_module(module), attribute)
    return __getattr__
