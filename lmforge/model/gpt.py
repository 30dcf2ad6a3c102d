"""GPT: a decoder-only causal language model.

    logits = GPT(config)(input_ids)          # [B, T] -> [B, T, vocab]: next-token logits
    out = model(input_ids, logits_mask=labels != -100, return_output=True)
    out.logits [N, vocab] (only the N kept positions), out.hidden_states [B, T, d], out.aux_loss

Position t only sees tokens <= t (causal mask), so one forward trains T next-token predictions at
once. With a KV cache the same model decodes one token at a time (see kv_cache.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .transformer import Transformer, init_weights


class CausalLMOutput(NamedTuple):
    """What one forward returns with `return_output=True` (a NamedTuple, so DDP and compile see tensors)."""

    logits: torch.Tensor                  # [B, T, V], or [N, V] for the positions in logits_mask
    hidden_states: torch.Tensor           # [B, T, d_model]: the final (normed) hidden states
    aux_loss: torch.Tensor | None         # MoE load-balancing (+ z) loss summed over layers; None if dense


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

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, logits_mask: torch.Tensor | None = None,
                return_output: bool = False) -> torch.Tensor | CausalLMOutput:
        """input_ids [B, T] (or inputs_embeds [B, T, d]) -> logits [B, T, vocab_size].

        logits_mask: bool [B, T]; the output layer runs only where it is True, giving [N, V]. With a
            large vocabulary and a loss on few tokens (SFT's assistant replies) this skips most of
            the biggest matmul and the [B, T, V] logits tensor.
        return_output: return CausalLMOutput (logits, hidden states, MoE aux loss) instead.
        See Transformer.forward for position_ids / document_ids (packed sequences).
        """
        hidden, aux_loss = self.transformer(input_ids, attention_mask, kv_cache=kv_cache, cache_rows=cache_rows,
                                            inputs_embeds=inputs_embeds, position_ids=position_ids,
                                            document_ids=document_ids)
        logits = self.lm_head(hidden if logits_mask is None else hidden[logits_mask])
        return CausalLMOutput(logits, hidden, aux_loss) if return_output else logits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> final hidden states [B, T, d_model] (for inference; training reads them from
        forward(..., return_output=True), so the pass goes through DDP's wrapper)."""
        return self.transformer(input_ids, attention_mask, kv_cache=kv_cache, cache_rows=cache_rows)[0]

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache.for_model(self, batch_size, max_seq_len, dtype)
