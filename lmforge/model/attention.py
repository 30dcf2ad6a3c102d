"""Multi-head self-attention: MHA, GQA and MQA, with a fast and an explicit path.

Shapes: B batch, T new tokens, S key positions (T, or cached + T), H query heads,
Hkv key/value heads (H % Hkv == 0), D head_dim.

Grouped-query attention shares each key/value head between H / Hkv query heads. That shrinks the
KV cache by the same factor, which is what makes long-context decoding cheap; Hkv = 1 is MQA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .norms import RMSNorm
from .positions import apply_rotary


@dataclass
class AttentionMask:
    """What every layer of one forward pass shares about who may attend to whom.

    `bias` is None (no mask; with `is_causal` SDPA applies the causal mask itself), a bool tensor
    (True = may attend) or a float tensor (added to the scores: ALiBi), broadcastable to [B, H, T, S].
    """

    bias: torch.Tensor | None
    is_causal: bool


@dataclass
class CacheStep:
    """Where this forward's keys/values go in the KV cache (see kv_cache.py)."""

    cache: KVCache
    rows: torch.Tensor | None      # [B] cache row per batch row; None = rows 0..B-1
    positions: torch.Tensor        # [B, T] absolute positions of the new tokens
    key_length: int                # S: how many cache positions the queries may look at


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # One fused projection for q, k and v: a single matmul instead of three.
        self.qkv = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=config.qkv_bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.attn_out_bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.rope_interleaved = config.rope_interleaved
        self.capture_attention = False                      # set by labs tools to keep probabilities
        self.last_attention_probs: torch.Tensor | None = None  # [B, H, T, S] when captured

    def forward(self, x: torch.Tensor, mask: AttentionMask, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache_step: CacheStep | None = None) -> torch.Tensor:
        """x: [B, T, d_model]; rope: RoPE (cos, sin) tables of the tokens' positions -> [B, T, d_model]."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)     # [B, H, T, D]
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope, self.rope_interleaved), apply_rotary(k, *rope, self.rope_interleaved)
        if cache_step is not None:
            k, v = cache_step.cache.update(self.layer_index, k, v, cache_step.rows, cache_step.positions,
                                           cache_step.key_length)
        if self.capture_attention:
            y = self._explicit(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.bias, is_causal=mask.is_causal and mask.bias is None,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.out(y)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + mask) v, written out, keeping the probabilities for inspection."""
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, S, D]
        scores = (q.float() @ k.float().transpose(-2, -1)) / self.head_dim ** 0.5        # [B, H, T, S]
        if mask.bias is not None:
            if mask.bias.dtype == torch.bool:
                scores = scores.masked_fill(~mask.bias, float("-inf"))
            else:
                scores = scores + mask.bias
        elif mask.is_causal:
            length, key_length = scores.shape[-2:]
            causal = torch.ones(length, key_length, dtype=torch.bool, device=q.device).tril(key_length - length)
            scores = scores.masked_fill(~causal, float("-inf"))
        probs = scores.softmax(dim=-1)
        self.last_attention_probs = probs.detach()
        return (probs @ v.float()).to(q.dtype)
