"""Lazy package exports: `from lmforge.train import Trainer` imports lmforge.train.loop (and torch)
only when the name is first used, so `lmforge --help` and light imports stay instant."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` resolving each exported name from its module ({name: module})."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module '{package}' has no attribute {name!r}")

    return __getattr__
