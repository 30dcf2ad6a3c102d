"""What a model costs: parameters, FLOPs per token, and memory, computed from its config.

FLOPs follow Kaplan et al. (2020) / PaLM: a forward pass costs 2 FLOPs per weight per token
(one multiply, one add), backward twice that, so training costs 6N per token, plus attention's
score and value matmuls, 2 * 2 * n_layers * T * (n_heads * head_dim) forward (x3 for training).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class ParameterCount:
    total: int
    embedding: int        # token (+ position, + token-type) embeddings
    non_embedding: int    # everything else, including an untied output head


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Analytic counts; equal to sum(p.numel()) of the built model (tested)."""
    d, L, V = config.d_model, config.n_layers, config.vocab_size
    qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    attn = d * qkv_out + config.n_heads * config.head_dim * d
    attn += (qkv_out if config.qkv_bias else 0) + (d if config.attn_out_bias else 0)
    attn += 2 * config.head_dim if config.qk_norm else 0
    up_width = 2 * config.d_ff if config.mlp == "swiglu" else config.d_ff
    dense_mlp = d * up_width + config.d_ff * d + ((up_width + d) if config.mlp_bias else 0)
    mlp = dense_mlp * config.n_experts + d * config.n_experts if config.n_experts else dense_mlp
    norm = d * (2 if config.norm == "layernorm" and config.norm_bias else 1)
    block = attn + mlp + 2 * norm
    embedding = V * d + (config.max_seq_len * d if config.position == "learned" else 0)
    embedding += config.type_vocab_size * d if config.arch == "bert" else 0
    non_embedding = L * block + (norm if config.final_norm else 0) + (norm if config.embedding_norm else 0)
    if config.arch == "gpt":
        non_embedding += 0 if config.tie_embeddings else V * d
    else:
        # MLM transform + LayerNorm + decoder bias (+ untied decoder) + pooler + classifier.
        non_embedding += d * d + d + 2 * d + V + (0 if config.tie_embeddings else V * d)
        non_embedding += d * d + d + d * config.n_labels + config.n_labels
    return ParameterCount(embedding + non_embedding, embedding, non_embedding)


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True, head_fraction: float = 1.0) -> float:
    """FLOPs per token for one forward (training=False) or forward+backward (training=True).

    head_fraction: the share of tokens the output layer runs on (SFT runs it on the trained
    tokens only, see GPT.forward's logits_mask); 1 = every token.
    """
    counts = count_parameters(config)
    active = counts.non_embedding
    if config.tie_embeddings:
        active += config.vocab_size * config.d_model        # the tied head still does a matmul
    if config.arch == "gpt":
        active -= (1 - head_fraction) * config.vocab_size * config.d_model
    if config.n_experts:
        # Only top_k of n_experts MLPs run per token.
        up_width = 2 * config.d_ff if config.mlp == "swiglu" else config.d_ff
        expert = config.d_model * up_width + config.d_ff * config.d_model
        active -= config.n_layers * expert * (config.n_experts - config.experts_top_k)
    context = min(seq_len, config.sliding_window or seq_len)
    attention = 2 * 2 * config.n_layers * context * config.n_heads * config.head_dim
    if config.is_causal:
        attention /= 2  # on average a causal query sees half the context
    forward = 2 * active + attention
    return 3 * forward if training else forward


def kv_cache_bytes(config: ModelConfig, seq_len: int, batch_size: int = 1, dtype: str = "bf16") -> int:
    """2 (k and v) x layers x kv_heads x head_dim x positions x batch x bytes."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * seq_len * batch_size * BYTES[dtype]


def activation_bytes(config: ModelConfig, seq_len: int, batch_size: int = 1, dtype: str = "bf16") -> int:
    """Rough activation memory kept for backward without checkpointing (Korthikanti et al. 2022,
    with SDPA/flash attention so the T x T score matrix is not stored):
    per layer ~ T*B*d*(16 + 2*d_ff/d) bytes at 2 bytes per value, plus the logits T*B*V*4."""
    per_layer = seq_len * batch_size * config.d_model * (16 + 2 * config.d_ff / config.d_model) * BYTES[dtype] / 2
    logits = seq_len * batch_size * config.vocab_size * 4
    return int(config.n_layers * per_layer + logits)


def describe(config: ModelConfig) -> str:
    """One readable line per architectural choice."""
    kind = "decoder-only causal LM (GPT)" if config.arch == "gpt" else "bidirectional encoder, masked LM (BERT)"
    if config.n_kv_heads == config.n_heads:
        attention = f"multi-head attention, {config.n_heads} heads x {config.head_dim}"
    elif config.n_kv_heads == 1:
        attention = f"multi-query attention, {config.n_heads} query heads x {config.head_dim}, 1 kv head"
    else:
        attention = (f"grouped-query attention, {config.n_heads} query heads x {config.head_dim}, "
                     f"{config.n_kv_heads} kv heads")
    position = {"rope": f"RoPE (theta={config.rope_theta:g}, {'interleaved' if config.rope_interleaved else 'half-split'})",
                "learned": "learned absolute", "sinusoidal": "sinusoidal absolute", "alibi": "ALiBi", "none": "none (NoPE)"}
    mlp = {"swiglu": "SwiGLU", "gelu": "GELU", "gelu_tanh": "GELU (tanh)", "relu2": "ReLU^2"}[config.mlp]
    if config.n_experts:
        mlp = f"MoE: {config.n_experts} {mlp} experts, top-{config.experts_top_k}"
    lines = [
        f"type        {kind}",
        f"layers      {config.n_layers} x d_model {config.d_model}, d_ff {config.d_ff}, context {config.max_seq_len}",
        f"attention   {attention}" + (" + QK-norm" if config.qk_norm else "")
        + (f", sliding window {config.sliding_window}" if config.sliding_window else ""),
        f"positions   {position[config.position]}",
        f"norm        {config.norm} ({config.norm_position}-norm, eps {config.norm_eps:g})",
        f"mlp         {mlp}",
        f"vocab       {config.vocab_size}" + (", tied input/output embeddings" if config.tie_embeddings else ""),
    ]
    return "\n".join(lines)
