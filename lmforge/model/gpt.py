"""GPT: a decoder-only causal language model.

    logits = GPT(config)(input_ids)          # [B, T] -> [B, T, vocab]: next-token logits

Position t only sees tokens <= t (causal mask), so one forward trains T next-token predictions at
once. With a KV cache the same model decodes one token at a time (see kv_cache.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .transformer import Transformer, init_weights


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config)
        if config.tie_embeddings:
            # The input embedding and the output projection share one matrix (Press & Wolf 2017):
            # fewer parameters and a better-trained output layer for rare tokens.
            self.lm_head.weight = self.transformer.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, vocab_size]."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, kv_cache, cache_rows))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> final hidden states [B, T, d_model] (what reward/value heads read)."""
        return self.transformer(input_ids, attention_mask, kv_cache=kv_cache, cache_rows=cache_rows)

    @property
    def last_aux_loss(self) -> torch.Tensor | None:
        """Sum over layers of the MoE auxiliary losses of the last forward (None for dense models)."""
        return self.transformer.aux_loss

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache.for_model(self, batch_size, max_seq_len, dtype)
