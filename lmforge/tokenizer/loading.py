"""`load_tokenizer(path)`: whatever tokenizer a path holds, behind one interface.

- a directory with `tokenizer.json`: our `BPETokenizer` when it is a byte-level BPE we reproduce
  exactly (lmforge's own, GPT-2, SmolLM2, ...), else `HFTokenizer` (WordPiece, Unigram, ...);
- a directory with GPT-2's `vocab.json` + `merges.txt`;
- a `.gguf` file (its embedded tokenizer), or a directory holding exactly one;
- a run/checkpoint directory with a `tokenizer/` subdirectory;
- the bundled names "smollm2" and "minilm".
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..errors import UserError
from .bpe import BPETokenizer
from .hf_wrapper import HFTokenizer
from .parts import NotByteLevelBPE

Tokenizer = Union[BPETokenizer, HFTokenizer]


def _bundled(name: str) -> Path | None:
    from .. import assets

    getters = {"smollm2": assets.smollm2_gguf_path, "smollm2-135m-instruct": assets.smollm2_gguf_path,
               "minilm": assets.minilm_dir, "all-minilm-l6-v2": assets.minilm_dir}
    getter = getters.get(name.lower())
    return getter() if getter is not None else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer at path (see the module docstring for what a path may be)."""
    location = Path(path)
    if not location.exists():
        bundled = _bundled(str(path))
        if bundled is None:
            raise UserError(f"tokenizer '{location}' does not exist; give a directory saved by "
                            "`lmforge tokenizer train`, an HF tokenizer directory or a .gguf file")
        location = bundled
    if location.is_file():
        if location.suffix == ".gguf":
            return BPETokenizer.from_gguf(location)
        if location.name.endswith(".json"):
            location = location.parent
        else:
            raise UserError(f"'{location}' is not a tokenizer file; give a tokenizer directory or a .gguf file")
    if (location / "tokenizer.json").is_file():
        try:
            return BPETokenizer.load(location)
        except NotByteLevelBPE:
            return HFTokenizer.from_directory(location)
    if (location / "vocab.json").is_file() and (location / "merges.txt").is_file():
        return BPETokenizer.from_gpt2_files(location / "vocab.json", location / "merges.txt")
    if (location / "tokenizer").is_dir():
        return load_tokenizer(location / "tokenizer")
    gguf_files = sorted(location.glob("*.gguf"))
    if len(gguf_files) == 1:
        return BPETokenizer.from_gguf(gguf_files[0])
    raise UserError(f"'{location}' holds no tokenizer (no tokenizer.json, vocab.json + merges.txt or single "
                    f".gguf); train one with `lmforge tokenizer train --out {location}`")
