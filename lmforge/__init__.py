"""lmforge: a hands-on LLM lab.

    from lmforge import load, load_tokenizer
    model, tokenizer = load("smollm2-135m-instruct")

Heavy modules (torch, transformers) are imported on first use so that `import lmforge` is cheap.
"""
from __future__ import annotations

from .lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "load": "lmforge.model.loading",
    "load_tokenizer": "lmforge.tokenizer",
    "UserError": "lmforge.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__ = lazy_getattr(__name__, _LAZY)
