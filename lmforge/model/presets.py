"""Named model configs. `vocab_size` is a default: training sets it from the tokenizer."""
from __future__ import annotations

import difflib
from typing import Any

from ..errors import UserError
from .config import ModelConfig

# GPT-2 recipe: LayerNorm with bias, learned absolute positions, GELU (tanh), biases everywhere.
_GPT2 = dict(arch="gpt", norm="layernorm", norm_bias=True, position="learned", mlp="gelu_tanh",
             qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, vocab_size=50257,
             max_seq_len=1024)
# Llama recipe: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases.
_LLAMA = dict(arch="gpt", norm="rmsnorm", position="rope", mlp="swiglu", qkv_bias=False,
              attn_out_bias=False, mlp_bias=False)
# Original BERT: post-norm, LayerNorm after the embeddings, learned positions, exact GELU.
_BERT = dict(arch="bert", norm="layernorm", norm_bias=True, norm_position="post", embedding_norm=True,
             final_norm=False, position="learned", mlp="gelu", qkv_bias=True, attn_out_bias=True,
             mlp_bias=True, norm_eps=1e-12, vocab_size=30522, max_seq_len=512, type_vocab_size=2)

PRESETS: dict[str, dict[str, Any]] = {
    # Small modern GPTs that train in seconds to minutes on a laptop CPU.
    "nano": {**_LLAMA, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128, "vocab_size": 512},
    "tiny": {**_LLAMA, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256, "vocab_size": 4096},
    "small": {**_LLAMA, "d_model": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4, "max_seq_len": 256, "vocab_size": 8192},
    # The same sizes with the GPT-2 recipe, for like-for-like comparisons.
    "gpt2-nano": {**_GPT2, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128, "vocab_size": 512},
    "gpt2-tiny": {**_GPT2, "d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 256, "vocab_size": 4096},
    "gpt2-small": {**_GPT2, "d_model": 256, "n_layers": 6, "n_heads": 8, "max_seq_len": 256, "vocab_size": 8192},
    # GPT-2 family (Radford et al. 2019).
    "gpt2-124m": {**_GPT2, "d_model": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-350m": {**_GPT2, "d_model": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-774m": {**_GPT2, "d_model": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-1.5b": {**_GPT2, "d_model": 1600, "n_layers": 48, "n_heads": 25},
    # Llama-style family.
    "llama-tiny": {**_LLAMA, "d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "max_seq_len": 512, "vocab_size": 8192},
    "llama-135m": {**_LLAMA, "d_model": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "d_ff": 1536,
                   "max_seq_len": 2048, "vocab_size": 49152, "rope_theta": 10000.0},          # SmolLM2-135M shape
    "llama-1b": {**_LLAMA, "d_model": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "d_ff": 8192,
                 "max_seq_len": 4096, "vocab_size": 128256, "rope_theta": 500000.0},     # Llama-3.2-1B shape
    "moe-tiny": {**_LLAMA, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256,
                 "vocab_size": 4096, "n_experts": 4, "experts_top_k": 2, "d_ff": 256},
    # BERT family (Devlin et al. 2019; bert-mini from Turc et al. 2019).
    "bert-base": {**_BERT, "d_model": 768, "n_layers": 12, "n_heads": 12},
    "bert-mini": {**_BERT, "d_model": 256, "n_layers": 4, "n_heads": 4},
    "bert-nano": {**_BERT, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128, "vocab_size": 512},
    "bert-tiny": {**_BERT, "d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 256, "vocab_size": 4096},
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named config, with keyword overrides (e.g. vocab_size from a tokenizer)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown model preset '{name}'{hint}; available presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides}).validate()
