"""Transformer models written from scratch: GPT (causal LM) and BERT (masked LM).

    from lmforge.model import get_preset, build_model
    model = build_model(get_preset("tiny", vocab_size=8192))
"""
from .bert import BERT
from .builders import build_model
from .config import ModelConfig
from .gpt import GPT
from .kv_cache import KVCache
from .presets import PRESETS, get_preset, preset_names

__all__ = ["BERT", "GPT", "KVCache", "ModelConfig", "PRESETS", "build_model", "get_preset", "preset_names"]
