"""The Llama family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM): RoPE, RMSNorm, SwiGLU."""
from __future__ import annotations

from typing import Any

import torch

from ...errors import UserError
from ..config import ModelConfig
from .rules import COMMON_FIXED, Family, Rule, fused, linear, qkv_sizes, rule

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    """LlamaForCausalLM and the architectures that share its layout (Mistral, Qwen2)."""
    model_type = hf.get("model_type", "llama")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act='{hf['hidden_act']}' is not supported for {model_type}; only 'silu' (SwiGLU) is")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"RoPE scaling '{rope_type}' is not supported; only plain RoPE (rope_type 'default') is")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    layer_types = set(hf.get("layer_types") or [])
    if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
        raise UserError(f"per-layer sliding-window attention ({model_type} use_sliding_window) is not supported")
    n_heads = hf.get("num_attention_heads", 32)
    d_model = hf.get("hidden_size", 4096)
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False            # Qwen2: biases on q, k, v only
    else:
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        arch="gpt", vocab_size=hf.get("vocab_size", 32000), max_seq_len=hf.get("max_position_embeddings", 2048),
        d_model=d_model, n_layers=hf.get("num_hidden_layers", 32), n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or d_model // n_heads,
        d_ff=hf.get("intermediate_size", 11008), mlp="swiglu", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        position="rope", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_interleaved=False, qkv_bias=qkv_bias, attn_out_bias=out_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        # MistralConfig's default window is 4096 when config.json does not say (null means none).
        sliding_window=hf.get("sliding_window", 4096) if model_type == "mistral" else None,
        tie_embeddings=hf.get("tie_word_embeddings", False), pad_id=hf.get("pad_token_id"),
    ).validate()


def llama_architecture(config: ModelConfig) -> str:
    """Llama covers q/k/v/o biases together; Qwen2 q/k/v biases only; Mistral a sliding window."""
    if config.sliding_window is not None:
        return "MistralForCausalLM"
    if config.qkv_bias and not config.attn_out_bias and not config.mlp_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def llama_hf_config(config: ModelConfig) -> dict[str, Any]:
    architecture = llama_architecture(config)
    hf = {
        "architectures": [architecture], "model_type": MODEL_TYPES[architecture],
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.d_ff, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0,
    }
    if architecture == "LlamaForCausalLM":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if architecture == "MistralForCausalLM":
        hf.update(sliding_window=config.sliding_window)
    return hf


def llama_rules(config: ModelConfig) -> list[Rule]:
    rules = [
        rule("transformer.embed_tokens.weight", "model.embed_tokens.weight"),
        rule("transformer.final_norm.weight", "model.norm.weight"),
    ]
    for i in range(config.n_layers):
        ours, theirs = f"transformer.blocks.{i}", f"model.layers.{i}"
        attention, mlp = f"{theirs}.self_attn", f"{theirs}.mlp"
        rules += [
            rule(f"{ours}.attn_norm.weight", f"{theirs}.input_layernorm.weight"),
            *fused(f"{ours}.attn.qkv", [f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj"],
                   qkv_sizes(config), bias=config.qkv_bias),
            *linear(f"{ours}.attn.out", f"{attention}.o_proj", bias=config.attn_out_bias),
            rule(f"{ours}.mlp_norm.weight", f"{theirs}.post_attention_layernorm.weight"),
            *fused(f"{ours}.mlp.gate_up", [f"{mlp}.gate_proj", f"{mlp}.up_proj"], (config.d_ff, config.d_ff),
                   bias=config.mlp_bias),
            *linear(f"{ours}.mlp.down", f"{mlp}.down_proj", bias=config.mlp_bias),
        ]
    if not config.tie_embeddings:
        rules.append(rule("lm_head.weight", "lm_head.weight"))
    return rules


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the q or k projection rows of every head from RoPE pairs (2i, 2i+1) to (i, i + D/2).

    Rotating channel pairs (2i, 2i+1) of W x equals rotating pairs (i, i+D/2) of P W x, where P
    moves row 2i to i and row 2i+1 to i + D/2 within each head. Scores q.k are unchanged since
    P is applied to both q and k. (This undoes llama.cpp's `permute` of GGUF q/k weights.)
    weight: [n_heads * D, ...] -> same shape.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


LLAMA_FIXED: dict[str, Any] = dict(
    arch="gpt", position="rope", norm="rmsnorm", norm_position="pre", embedding_norm=False, final_norm=True,
    mlp="swiglu", **COMMON_FIXED)

LLAMA = Family(llama_config, llama_hf_config, llama_rules, "model.", ("lm_head.",), "model.layers.", LLAMA_FIXED)
