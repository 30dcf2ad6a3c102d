"""A compiled decode step: one fused graph per token instead of ~25 eager ops per layer.

Eager PyTorch spends microseconds of Python and dispatch on every op. A small model runs a few
hundred ops per token, so on a CPU that overhead, not arithmetic, sets its decode speed.
`torch.compile` removes it, but only for code with static shapes and no Python branches on
tensor values, which the general forward (any subset of cache rows, keys up to the longest row)
does not have. This is the same decode step written for the compiler:

- every KV-cache row decodes at every step, so shapes never change ([B_max, 1] tokens). Rows
  with nothing to decode compute values nobody reads; the K/V they write lands at their current
  length, where the row's next real token (or next prefill) overwrites it;
- attention always spans the whole cache [T_max], masked to the positions each row has filled.

It reuses the model's own modules (norms, projections, MLPs, RoPE tables) and only re-states
the order in which a block applies them; `tests/test_infer_static_decode.py` checks it against
the model's forward. Compiling pays off where overhead dominates (small models on a CPU); a
large model on a CPU is bound by reading its weights, which no compiler shortens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..model.kv_cache import KVCache
from ..model.positions import apply_rotary


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this model cannot use the static decode step (None when it can)."""
    config = model.config
    if config.arch != "gpt":
        return "it is not a causal LM"
    if config.position == "alibi":
        return "ALiBi positions are not supported"
    if config.n_experts > 0:
        return "mixture-of-experts routing depends on the data"
    return None


class StaticDecodeStep:
    """decode(tokens [B_max], cache) -> final hidden states [B_max, d_model], all cache rows at once."""

    def __init__(self, model: nn.Module, cache: KVCache, compile: bool = True) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise UserError(f"compiled decoding does not support this model ({reason}); run without --compile")
        self.model, self.cache = model, cache
        self.config = model.config
        self.rows = torch.arange(cache.batch_size, device=cache.lengths.device)
        self.key_positions = torch.arange(cache.max_seq_len, device=cache.lengths.device)
        self._step = torch.compile(self._forward, dynamic=False, fullgraph=True) if compile else self._forward

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B_max] (the token to feed in each row) -> hidden [B_max, d_model]. Lengths are not advanced."""
        # A full idle row would write one past the end; its output is unused, so clamp it.
        return self._step(tokens, self.cache.lengths.clamp(max=self.cache.max_seq_len - 1))

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        transformer, config = self.model.transformer, self.config
        x = transformer.embed_tokens(tokens)[:, None]                         # [B, 1, d]
        if transformer.embed_positions is not None:
            x = x + transformer.embed_positions(positions)[:, None]
        elif config.position == "sinusoidal":
            x = x + transformer.sinusoidal[positions][:, None].to(x.dtype)
        if transformer.embedding_norm is not None:
            x = transformer.embedding_norm(x)
        rotary = None
        if transformer.rotary is not None:
            # [B, 1, 1, D/2]: broadcast over heads and the single new position; computed once for all layers.
            rotary = (transformer.rotary.cos[positions][:, None, None], transformer.rotary.sin[positions][:, None, None])
        allowed = self.key_positions[None] <= positions[:, None]                # [B, T_max]
        if config.sliding_window is not None:
            allowed = allowed & (positions[:, None] - self.key_positions[None] < config.sliding_window)
        allowed = allowed[:, None, None]                                          # [B, 1, 1, T_max]
        for layer, block in enumerate(transformer.blocks):
            if block.pre_norm:
                x = x + self._attention(block.attn, block.attn_norm(x), layer, positions, rotary, allowed)
                x = x + block.mlp(block.mlp_norm(x))
            else:
                x = block.attn_norm(x + self._attention(block.attn, x, layer, positions, rotary, allowed))
                x = block.mlp_norm(x + block.mlp(x))
        if transformer.final_norm is not None:
            x = transformer.final_norm(x)
        return x[:, 0]

    def _attention(self, attn: nn.Module, x: torch.Tensor, layer: int, positions: torch.Tensor,
                   rotary: tuple[torch.Tensor, torch.Tensor] | None, allowed: torch.Tensor) -> torch.Tensor:
        """x [B, 1, d] -> [B, 1, d]; writes this token's key and value at `positions` in every row."""
        batch = x.shape[0]
        heads, kv_heads, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        q, k, v = attn.qkv(x).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = q.view(batch, 1, heads, head_dim).transpose(1, 2)                  # [B, H, 1, D]
        k = k.view(batch, 1, kv_heads, head_dim).transpose(1, 2)               # [B, Hkv, 1, D]
        v = v.view(batch, 1, kv_heads, head_dim).transpose(1, 2)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q = apply_rotary(q, cos, sin, self.config.rope_interleaved)
            k = apply_rotary(k, cos, sin, self.config.rope_interleaved)
        keys, values = self.cache.keys[layer], self.cache.values[layer]       # [B, Hkv, T_max, D]
        keys[self.rows, :, positions] = k[:, :, 0].to(keys.dtype)
        values[self.rows, :, positions] = v[:, :, 0].to(values.dtype)
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=allowed,
                                           enable_gqa=kv_heads != heads)
        return attn.out(y.transpose(1, 2).reshape(batch, 1, heads * head_dim))
