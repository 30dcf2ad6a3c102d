"""Which HF architectures lmforge reads, and HF config.json -> ModelConfig with clear errors."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from ...errors import UserError
from ..config import ModelConfig
from .bert import BERT
from .gpt2 import GPT2
from .llama import LLAMA
from .rules import Family

SUPPORTED_ARCHITECTURES: dict[str, Family] = {
    "GPT2LMHeadModel": GPT2,
    "BertModel": BERT,
    "BertForMaskedLM": BERT,
    "BertForPreTraining": BERT,
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
}
# When config.json lists no architecture, its model_type picks the default one.
DEFAULT_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "llama": "LlamaForCausalLM",
                        "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# RoPE precomputes a table per position: a damaged config.json claiming billions of positions
# must be refused, not allocated. 16M positions is far beyond any model this lab runs.
MAX_CONTEXT = 1 << 24
# Sizes index int32 tensors (and torch refuses dimensions past int64): anything larger is damage.
MAX_SIZE = 1 << 31


def hf_architecture(hf: Any, where: str) -> str:
    """The supported architecture named by an HF config.json, or a clear error listing them."""
    if not isinstance(hf, dict):
        raise UserError(f"{where} is a JSON {type(hf).__name__}, not an object; fix config.json")
    names = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if not names and isinstance(model_type, str) and model_type in DEFAULT_ARCHITECTURE:
        names = [DEFAULT_ARCHITECTURE[model_type]]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UserError(f"{where} has architectures={names!r}, which is not a list of names; fix config.json")
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(names) or f"model_type '{model_type}'"
    raise UserError(f"{where} is {found}, which lmforge cannot import; supported architectures: "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    """HF config.json contents -> ModelConfig (nothing but the config is read)."""
    family = SUPPORTED_ARCHITECTURES[hf_architecture(hf, where)]
    try:
        config = family.config(hf)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, ZeroDivisionError) as error:
        raise UserError(f"{where} has an invalid or missing value ({error!r}); fix config.json") from None
    return checked_types(config, where)


def checked_types(config: ModelConfig, where: str) -> ModelConfig:
    """Refuse field values of the wrong type (a layer count of 2.5 or "4", a NaN epsilon) before
    anything is built from them: config.json is JSON, and `validate` only checks ranges."""
    hints = typing.get_type_hints(ModelConfig)
    updates: dict[str, Any] = {}
    for field in dataclasses.fields(ModelConfig):
        value, hint = getattr(config, field.name), hints[field.name]
        optional = type(None) in typing.get_args(hint)
        kind = next((t for t in (bool, int, float, str) if t is hint or t in typing.get_args(hint)), None)
        if value is None and optional or kind is None:
            continue
        if field.name == "pad_id":
            # Only recorded (for export): an odd value in config.json must not stop the import.
            if type(value) is not int or not 0 <= value < config.vocab_size:
                updates["pad_id"] = None
            continue
        if kind is bool and type(value) is int and value in (0, 1):
            updates[field.name] = bool(value)
        elif not _is(value, kind):
            raise UserError(f"{where} gives {field.name}={value!r}, which is not {_ARTICLE[kind]}; fix config.json")
        elif kind is int and abs(value) >= MAX_SIZE:
            raise UserError(f"{where} gives {field.name}={value:,}, beyond any size lmforge can build; fix config.json")
    if config.max_seq_len > MAX_CONTEXT:
        raise UserError(f"{where} gives a context of {config.max_seq_len:,} positions, beyond the {MAX_CONTEXT:,} "
                        "lmforge supports; fix config.json")
    return dataclasses.replace(config, **updates) if updates else config


_ARTICLE = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return type(value) in (int, float) and _finite(value)
    return type(value) is kind


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
