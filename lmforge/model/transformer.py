"""The transformer trunk shared by GPT and BERT: embeddings -> N blocks -> (final norm).

GPT and BERT differ only by config (causal vs bidirectional mask, pre- vs post-norm, position
scheme) and by the heads they put on top of the trunk (gpt.py, bert.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .attention import Attention, AttentionMask, CacheStep
from .config import ModelConfig
from .kv_cache import KVCache
from .mlp import MixtureOfExperts, build_mlp
from .norms import build_norm
from .positions import RotaryEmbedding, alibi_slopes, sinusoidal_table
from .shared_prefix import SharedPrefixCache


class Block(nn.Module):
    """One layer. Pre-norm: x + f(norm(x)) (stable deep training, GPT-2/Llama).
    Post-norm: norm(x + f(x)) (the original Transformer and BERT)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = build_norm(config.norm, config.d_model, config.norm_eps, config.norm_bias)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = build_norm(config.norm, config.d_model, config.norm_eps, config.norm_bias)
        self.mlp = build_mlp(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: AttentionMask, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache_step: CacheStep | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, T, d_model] -> (x [B, T, d_model], the MoE auxiliary loss or None for a dense MLP)."""
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.attn_norm(x), mask, rope, cache_step))
            out, aux = self._mlp(self.mlp_norm(x))
            return x + self.dropout(out), aux
        x = self.attn_norm(x + self.dropout(self.attn(x, mask, rope, cache_step)))
        out, aux = self._mlp(x)
        return self.mlp_norm(x + self.dropout(out)), aux

    def _mlp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(self.mlp, MixtureOfExperts):
            return self.mlp(x)
        return self.mlp(x), None


class Transformer(nn.Module):
    """Token (+ position, + token-type) embeddings, the blocks, and the final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.embed_token_types = nn.Embedding(config.type_vocab_size, config.d_model) if config.arch == "bert" else None
        if config.position == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(config.max_seq_len, config.d_model), persistent=False)
        self.embedding_norm = (build_norm(config.norm, config.d_model, config.norm_eps, config.norm_bias)
                               if config.embedding_norm else None)
        self.dropout = nn.Dropout(config.dropout)
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_interleaved, config.max_seq_len)
                       if config.position == "rope" else None)
        if config.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_heads), persistent=False)
        self.blocks = nn.ModuleList(Block(config, index) for index in range(config.n_layers))
        self.final_norm = (build_norm(config.norm, config.d_model, config.norm_eps, config.norm_bias)
                           if config.final_norm else None)
        self.gradient_checkpointing = False  # recompute block activations in backward to save memory

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                cache_rows: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (or their embeddings) -> (hidden [B, T, d_model], MoE auxiliary loss or None).

        input_ids: [B, T], or None when `inputs_embeds` [B, T, d_model] is given (prompt tuning
            prepends learned vectors that are no token's embedding).
        attention_mask: [B, T], 1 = token, 0 = right padding.
        position_ids / document_ids: [B, T] for packed sequences: several examples share a row,
            positions restart at 0 for each, and a token attends only to earlier tokens of its own
            document (a block-diagonal causal mask), so an example never sees what is packed before it.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        batch, length = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if kv_cache is not None:
            if position_ids is not None or document_ids is not None:
                raise ValueError("packed sequences (position_ids, document_ids) are for training, not the KV cache")
            positions, new_lengths, key_length = kv_cache.plan(cache_rows, length, attention_mask)
            cache_step = CacheStep(kv_cache, cache_rows, positions, key_length)
        else:
            if length > self.config.max_seq_len and self.config.position in ("learned", "sinusoidal"):
                raise UserError(f"the input has {length} tokens but the model's context is {self.config.max_seq_len}; "
                                "truncate the input")
            positions = position_ids if position_ids is not None else torch.arange(length, device=device)[None]
            key_length, cache_step = length, None
        if isinstance(kv_cache, SharedPrefixCache):
            mask = kv_cache.attention_mask(length)
        else:
            mask = self.attention_mask(positions, key_length, attention_mask, cached=kv_cache is not None,
                                       document_ids=document_ids)
        rope = None
        if self.rotary is not None:
            # Packed positions never exceed the row length, so `length` bounds the table either way.
            self.rotary.extend(key_length)
            rope = self.rotary.tables(positions)

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        elif self.config.position == "sinusoidal":
            x = x + self.sinusoidal[positions].to(x.dtype)
        if self.embed_token_types is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros(batch, length, dtype=torch.long,
                                                                                  device=device)
            x = x + self.embed_token_types(types)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        x = self.dropout(x)

        aux_losses = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x, aux = checkpoint(block, x, mask, rope, cache_step, use_reentrant=False)
            else:
                x, aux = block(x, mask, rope, cache_step)
            if aux is not None:
                aux_losses.append(aux)
        if kv_cache is not None:
            kv_cache.commit(cache_rows, new_lengths)
        hidden = self.final_norm(x) if self.final_norm is not None else x
        return hidden, (torch.stack(aux_losses).sum() if aux_losses else None)

    def attention_mask(self, positions: torch.Tensor, key_length: int, padding: torch.Tensor | None,
                       cached: bool, document_ids: torch.Tensor | None = None) -> AttentionMask:
        """Build the mask once per forward; every layer shares it.

        The common training case (no padding, no cache, no window, no ALiBi, no packing) passes no
        tensor at all and lets SDPA apply causality itself, which is its fastest path.
        """
        config = self.config
        plain = (padding is None and document_ids is None and config.sliding_window is None
                 and config.position != "alibi")
        if plain and not cached:
            return AttentionMask(None, is_causal=config.is_causal)
        if plain and config.is_causal and (positions.shape[0] == 1 or bool((positions[:, 0] == positions[0, 0]).all())):
            # Every row starts at the same cache position (batch-1 decoding always does).
            if positions.shape[1] == 1:
                return AttentionMask(None, is_causal=False)   # one new token sees every cached key
            if int(positions[0, 0]) == 0:
                return AttentionMask(None, is_causal=True)    # prefill of empty rows: plain causal
        if document_ids is not None:
            # Packed rows: order and distance are by index in the row (position ids restart per
            # document), and a query sees keys of its own document only.
            positions = torch.arange(key_length, device=positions.device)[None]
        key_positions = torch.arange(key_length, device=positions.device)
        query_positions = positions[:, :, None]                                   # [B|1, T, 1]
        allowed = torch.ones(1, 1, 1, dtype=torch.bool, device=positions.device)
        if config.is_causal:
            allowed = key_positions <= query_positions                            # [B|1, T, S]
        if config.sliding_window is not None:
            allowed = allowed & (query_positions - key_positions < config.sliding_window)
        if document_ids is not None:
            allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
        if padding is not None and not cached:
            allowed = allowed & padding[:, None, :].bool()
        # A query always sees itself, so fully padded rows never produce NaN (their output is ignored).
        allowed = (allowed | (key_positions == query_positions))[:, None]        # [B|1, 1, T, S]
        if config.position != "alibi":
            return AttentionMask(allowed, is_causal=False)
        distance = (query_positions - key_positions).abs().float()[:, None]      # [B|1, 1, T, S]
        bias = -self.alibi_slopes[None, :, None, None].to(distance.device) * distance
        return AttentionMask(bias.masked_fill(~allowed, float("-inf")), is_causal=False)


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """Normal(0, init_std) for matrices and embeddings, zero biases, unit norms.

    GPT-2's scaled init: the projections that write into the residual stream (attention out, MLP
    down) get std / sqrt(2 * n_layers), so the residual's variance does not grow with depth.
    """
    residual_std = config.init_std / math.sqrt(2 * config.n_layers) if config.scaled_residual_init else config.init_std
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith((".attn.out", ".down")) else config.init_std
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=config.init_std)
