"""Prefix tuning (Li & Liang 2021) and the KV-cache prefix that serves all three prompt methods.

Prefix tuning learns, for every layer, n key and value vectors placed in front of the keys and
values of the input: [L, 2, Hkv, n, D], stored flat as [n, L*2*Hkv*D] (per virtual token: layer,
key|value, head, dim, the order peft's get_prompt views it in). `PrefixEncoder` makes them,
directly or reparametrised through an MLP (E [n, Hkv*D] -> tanh -> L*2*Hkv*D), which Li & Liang
found stabler to train.

Keys and values of a prefix enter the model the way past tokens do: through a KV cache.
`cache_with_prefix` is a fresh cache holding them (training: the input then sits at positions
n..), and `PrefixKVCache` writes them into positions 0..n-1 of a row whenever the engine resets
it (inference). Prompt tuning and P-tuning use the same `PrefixKVCache`: their n virtual tokens'
keys and values do not depend on what follows them (attention is causal).
PromptTunedLM (prompt.py) is the model that uses these.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.kv_cache import KVCache

KVPairs = list[tuple[torch.Tensor, torch.Tensor]]        # per layer (keys, values) [Hkv, n, D]


class PrefixEncoder(nn.Module):
    """Prefix tuning: () -> [n, L * 2 * Hkv * D], directly or through E [n, Hkv*D] -> MLP (tanh)."""

    def __init__(self, n: int, kv_dim: int, n_layers: int, projection: bool, hidden: int) -> None:
        super().__init__()
        self.projection = projection
        out = n_layers * 2 * kv_dim
        self.embedding = nn.Embedding(n, kv_dim if projection else out)
        if projection:
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight
        return self.transform(weight) if self.projection else weight


def prefix_pairs(values: torch.Tensor, config: Any) -> KVPairs:
    """[n, L*2*Hkv*D] (PrefixEncoder's output) -> per layer (keys, values) [Hkv, n, D] (views)."""
    n = values.shape[0]
    # [n, L*2*Hkv*D] -> [n, 2L, Hkv, D] -> [2L, Hkv, n, D]: layer l's keys at 2l, values at 2l+1
    kv = values.view(n, 2 * config.n_layers, config.n_kv_heads, config.head_dim).permute(1, 2, 0, 3)
    return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(config.n_layers)]


def cache_with_prefix(pairs: KVPairs, config: Any, batch: int, length: int, dtype: torch.dtype,
                      device: torch.device) -> KVCache:
    """A fresh cache for `batch` rows of `length` input tokens whose positions 0..n-1 hold the
    prefix (with autograd), so the input sits at positions n.. and attends to it (what peft's
    past_key_values does)."""
    n = pairs[0][0].shape[1]
    cache = KVCache(config.n_layers, batch, n + length, config.n_kv_heads, config.head_dim, dtype, device)
    for layer, (k, v) in enumerate(pairs):
        cache.keys[layer][:, :, :n] = k
        cache.values[layer][:, :, :n] = v
    cache.lengths.fill_(n)
    return cache


class PrefixKVCache(KVCache):
    """A KV cache whose rows start with a prefix: `reset(rows)` writes it at positions 0..n-1.

    prefix: called at each reset, returns one (keys, values) pair [Hkv, n, D] per layer."""

    def __init__(self, prefix: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = prefix
        self.reset()

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        pairs = self.prefix()
        n = pairs[0][0].shape[1]
        index = (slice(None) if rows is None
                 else torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device))
        for layer, (k, v) in enumerate(pairs):
            self.keys[layer][index, :, :n] = k.to(self.keys[layer].dtype)
            self.values[layer][index, :, :n] = v.to(self.values[layer].dtype)
        self.lengths[index] = n


def rope_layout(values: torch.Tensor, config: Any, to_hf: bool) -> torch.Tensor:
    """Prefix keys [n, L*2*Hkv*D] between our interleaved RoPE pairs (2i, 2i+1) and HF's halves
    (i, i + D/2); PEFT's file holds HF's layout."""
    n, L, H, D = values.shape[0], config.n_layers, config.n_kv_heads, config.head_dim
    kv = values.view(n, L, 2, H, D).clone()
    keys = kv[:, :, 0]
    order = (keys.reshape(n, L, H, D // 2, 2).transpose(-1, -2) if to_hf
             else keys.reshape(n, L, H, 2, D // 2).transpose(-1, -2))
    kv[:, :, 0] = order.reshape(n, L, H, D)
    return kv.reshape(values.shape)
