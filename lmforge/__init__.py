"""lmforge: a hands-on LLM lab.

    from lmforge import load, load_tokenizer
    model, tokenizer = load("smollm2-135m-instruct")

Heavy modules (torch, transformers) are imported on first use so that `import lmforge` is cheap.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("lmforge.model.loading", "load"),
    "load_tokenizer": ("lmforge.tokenizer", "load_tokenizer"),
    "UserError": ("lmforge.errors", "UserError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
