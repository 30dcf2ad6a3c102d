"""GPT-2 (GPT2LMHeadModel, GPT2Model): learned positions, pre-LayerNorm, GELU, Conv1D weights."""
from __future__ import annotations

from typing import Any

from ...errors import UserError
from ..config import ModelConfig
from .rules import COMMON_FIXED, Family, Rule, gelu_activation, linear, norm, rule


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise UserError("scale_attn_by_inverse_layer_idx=true (Mistral-style GPT-2 variants) is not supported")
    if hf.get("scale_attn_weights") is False:
        raise UserError("scale_attn_weights=false (unscaled attention) is not supported")
    d_model = hf.get("n_embd", 768)
    return ModelConfig(
        arch="gpt", vocab_size=hf.get("vocab_size", 50257), max_seq_len=hf.get("n_positions", 1024),
        d_model=d_model, n_layers=hf.get("n_layer", 12), n_heads=hf.get("n_head", 12),
        d_ff=hf.get("n_inner") or 4 * d_model, mlp=gelu_activation(hf, "activation_function", "gelu_new"),
        norm="layernorm", norm_bias=True, norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        pad_id=hf.get("pad_token_id"),
    ).validate()


def gpt2_hf_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.max_seq_len, "n_embd": config.d_model,
        "n_layer": config.n_layers, "n_head": config.n_heads, "n_inner": config.d_ff,
        "activation_function": "gelu_new" if config.mlp == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": None, "eos_token_id": None,   # GPT2Config's 50256 default is wrong for other vocabularies
    }


def gpt2_rules(config: ModelConfig) -> list[Rule]:
    rules = [
        rule("transformer.embed_tokens.weight", "transformer.wte.weight"),
        rule("transformer.embed_positions.weight", "transformer.wpe.weight"),
        *norm("transformer.final_norm", "transformer.ln_f", bias=True),
    ]
    for i in range(config.n_layers):
        ours, theirs = f"transformer.blocks.{i}", f"transformer.h.{i}"
        rules += [
            *norm(f"{ours}.attn_norm", f"{theirs}.ln_1", bias=True),
            # c_attn is already fused [q | k | v]; only the Conv1D transpose differs.
            *linear(f"{ours}.attn.qkv", f"{theirs}.attn.c_attn", bias=True, conv1d=True),
            *linear(f"{ours}.attn.out", f"{theirs}.attn.c_proj", bias=True, conv1d=True),
            *norm(f"{ours}.mlp_norm", f"{theirs}.ln_2", bias=True),
            *linear(f"{ours}.mlp.up", f"{theirs}.mlp.c_fc", bias=True, conv1d=True),
            *linear(f"{ours}.mlp.down", f"{theirs}.mlp.c_proj", bias=True, conv1d=True),
        ]
    if not config.tie_embeddings:
        rules.append(rule("lm_head.weight", "lm_head.weight"))
    return rules


GPT2_FIXED: dict[str, Any] = dict(
    arch="gpt", position="learned", norm="layernorm", norm_bias=True, norm_position="pre", embedding_norm=False,
    final_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True, sliding_window=None, **COMMON_FIXED)

GPT2 = Family(gpt2_config, gpt2_hf_config, gpt2_rules, "transformer.", ("lm_head.",), "transformer.h.", GPT2_FIXED)
