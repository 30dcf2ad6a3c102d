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
from .lm_head_loss import linear_cross_entropy
from .transformer import Transformer, init_weights


class CausalLMOutput(NamedTuple):
    """What one forward returns with `return_output=True` (a NamedTuple, so DDP and compile see tensors)."""

    logits: torch.Tensor                  # [B, T, V], or [N, V] for the positions in logits_mask
    hidden_states: torch.Tensor           # [B, T, d_model]: the final (normed) hidden states
    aux_loss: torch.Tensor | None         # MoE load-balancing (+ z) loss summed over layers; None if dense
    loss_sum: torch.Tensor | None = None  # with `labels`: summed cross-entropy (fp32 scalar); logits are then None
    correct: torch.Tensor | None = None   # with `labels`: how many labels are the argmax (no grad)


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
                labels: torch.Tensor | None = None, return_output: bool = False) -> torch.Tensor | CausalLMOutput:
        """input_ids [B, T] (or inputs_embeds [B, T, d]) -> logits [B, T, vocab_size].

        logits_mask: bool [B, T]; the output layer runs only where it is True, giving [N, V]. With a
            large vocabulary and a loss on few tokens (SFT's assistant replies) this skips most of
            the biggest matmul and the [B, T, V] logits tensor.
        labels: [B, T] next-token labels (IGNORE_INDEX = none): return CausalLMOutput with the summed
            cross-entropy and no logits, the output layer and the loss fused chunk by chunk
            (lm_head_loss.py), so the [B, T, V] logits never exist. Implies return_output.
        return_output: return CausalLMOutput (logits, hidden states, MoE aux loss) instead.
        See Transformer.forward for position_ids / document_ids (packed sequences).
        """
        hidden, aux_loss = self.transformer(input_ids, attention_mask, kv_cache=kv_cache, cache_rows=cache_rows,
                                            inputs_embeds=inputs_embeds, position_ids=position_ids,
                                            document_ids=document_ids)
        if labels is not None:
            kept_hidden, kept_labels = (hidden, labels) if logits_mask is None else (hidden[logits_mask], labels[logits_mask])
            if type(self.lm_head) is nn.Linear:
                loss_sum, correct = linear_cross_entropy(kept_hidden, self.lm_head.weight, kept_labels)
            else:   # an adapted output layer (LoRA, quantized): its own forward, then the loss
                logits = self.lm_head(kept_hidden).float().reshape(-1, self.config.vocab_size)
                flat = kept_labels.reshape(-1)
                loss_sum = nn.functional.cross_entropy(logits, flat, ignore_index=-100, reduction="sum")
                correct = ((logits.argmax(-1) == flat) & (flat != -100)).sum().float().detach()
            return CausalLMOutput(None, hidden, aux_loss, loss_sum, correct)
        logits = self.lm_head(hidden if logits_mask is None else hidden[logits_mask])
        return CausalLMOutput(logits, hidden, aux_loss) if return_output else logits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> final hidden states [B, T, d_model] (for inference; training reads them from
        forward(..., return_output=True), so the pass goes through DDP's wrapper)."""
        return self.transformer(input_ids, attention_mask, kv_cache=kv_cache, cache_rows=cache_rows)[0]

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache.for_model(self, batch_size, max_seq_len, dtype)
