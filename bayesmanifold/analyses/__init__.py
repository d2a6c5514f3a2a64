"""Analyses: one module per measurement, each an accumulator fed by capture and a result value.

Every name the registry (:mod:`.registry`) lists is importable from ``bayesmanifold.analyses``; a
module is imported when one of its names is first used, so importing the package stays cheap.
"""

import importlib
from typing import Any

from .registry import exports

# name -> module (relative to this package) that defines it: from the one registry of measurements
_WHERE = exports()

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bayesmanifold.analyses' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
