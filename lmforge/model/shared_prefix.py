"""Training forwards where many rows share a prompt: run each distinct prompt once.

GRPO samples G completions per prompt and trains on all of them; DPO scores a chosen and a
rejected reply to one prompt. Fed as plain [B, prompt + completion] rows, every prompt token goes
through the model G times (or twice), forward and backward, though its hidden states are the same
in every copy. Causal attention makes the prompt's keys and values independent of what follows,
so they can be computed once and attended to by every continuation, in the autograd graph: the
gradients of the G continuations flow back into the one prompt forward and add up there, which
is exactly the gradient of the duplicated rows ("shared-prefix forward", as in Prefix Grouper,
Liu et al. 2025). With a GRPO step of 16 rows of ~43 prompt + 32 completion tokens and G = 8,
the tokens through the model fall from 1,200 to ~600.

    logits, states = predicted_logits(model, ids, mask, predicted, prompt_lengths)   # [M, V], [M, d]
    # shared_prefix_states, when it applies (else the plain forward):
    #         cache = SharedPrefixCache(prompt lengths [P], owner [B])
    #         model.transformer(prompt_ids, kv_cache=cache)        phase 1: [P, Pmax], keys/values kept
    #         cache.continue_rows()
    #         model.transformer(continuation_ids, kv_cache=cache)  phase 2: [B, Tc] attends to its prompt

The layout the continuation attends over is [its prompt, padded to Pmax | its own tokens]: key j
< Pmax is allowed when j < its prompt's length, key Pmax + s when s <= t (causal). Positions
(RoPE, learned embeddings) are the true ones: prompt length + t.
"""
from __future__ import annotations

import torch

from .attention import AttentionMask


class SharedPrefixCache:
    """Duck-types KVCache (plan/update/commit) for one training forward pair; no fixed storage."""

    def __init__(self, prefix_lengths: torch.Tensor, owner: torch.Tensor) -> None:
        self.prefix_lengths = prefix_lengths       # [P] real tokens of each distinct prompt
        self.owner = owner                         # [B] which prompt each continuation row extends
        self.prefix_width = 0                      # Pmax, set by the prefix forward
        self.keys: dict[int, torch.Tensor] = {}    # layer -> [P, Hkv, Pmax, D], in the graph
        self.values: dict[int, torch.Tensor] = {}
        self.continuing = False

    def continue_rows(self) -> None:
        """Switch from the prompts' forward to the continuations' forward."""
        self.continuing = True

    def plan(self, rows: torch.Tensor | None, length: int, attention_mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(positions [B, T], new lengths (unused), S), as KVCache.plan."""
        device = self.prefix_lengths.device
        steps = torch.arange(length, device=device)
        if not self.continuing:
            self.prefix_width = length
            return steps[None].expand(len(self.prefix_lengths), -1), self.prefix_lengths, length
        positions = self.prefix_lengths[self.owner][:, None] + steps
        return positions, self.prefix_lengths[self.owner] + length, self.prefix_width + length

    def commit(self, rows: torch.Tensor | None, new_lengths: torch.Tensor) -> None:
        """Nothing to advance: the two forwards keep no lengths."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None,
               positions: torch.Tensor, key_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts: keep k, v [P, Hkv, Pmax, D]. Continuations: return [B, Hkv, Pmax + Tc, D]."""
        if not self.continuing:
            self.keys[layer], self.values[layer] = k, v
            return k, v
        return (torch.cat([self.keys[layer][self.owner], k], dim=2),
                torch.cat([self.values[layer][self.owner], v], dim=2))

    def attention_mask(self, length: int) -> AttentionMask:
        """Prompts: plain causal (right padding is never attended to by a real token).
        Continuations: bool [B, 1, Tc, Pmax + Tc] as described in the module docstring."""
        if not self.continuing:
            return AttentionMask(None, is_causal=True)
        device = self.prefix_lengths.device
        prefix = torch.arange(self.prefix_width, device=device) < self.prefix_lengths[self.owner][:, None]   # [B, Pmax]
        own = torch.ones(length, length, dtype=torch.bool, device=device).tril()                      # [Tc, Tc]
        allowed = torch.cat([prefix[:, None, :].expand(-1, length, -1), own.expand(len(self.owner), -1, -1)], dim=2)
        return AttentionMask(allowed[:, None], is_causal=False)


def shared_prompts(input_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Rows [B, T] whose first prompt_lengths[b] tokens are equal share a prompt.
    Returns (the first row of each distinct prompt [P], the distinct prompt of every row [B])."""
    index: dict[tuple[int, ...], int] = {}
    representatives: list[int] = []
    owner: list[int] = []
    for row, (ids, n) in enumerate(zip(input_ids.tolist(), prompt_lengths.tolist())):
        key = tuple(ids[:n])
        if key not in index:
            index[key] = len(representatives)
            representatives.append(row)
        owner.append(index[key])
    return representatives, torch.tensor(owner, device=input_ids.device)


def can_share_prefix(transformer: torch.nn.Module) -> bool:
    """The shared layout needs causal attention with no distance-dependent mask (ALiBi, a sliding
    window) and no recomputation (activation checkpointing would replay the two phases out of order)."""
    config = transformer.config
    return (config.is_causal and config.position != "alibi" and config.sliding_window is None
            and config.n_experts == 0 and not (transformer.gradient_checkpointing and transformer.training))


def shared_prefix_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         predicted: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor | None:
    """The final hidden states at the `predicted` positions, each distinct prompt run once.

    input_ids, attention_mask: right-padded [B, T] rows prompt + continuation; predicted: bool [B, T],
    the positions whose next token is scored (all at or after the prompt's last token);
    prompt_lengths: [B] (>= 1). Returns [M, d] in the order of a plain forward's hidden[predicted],
    or None where the plain forward should run: no two rows share a prompt, the model cannot use
    the shared layout (can_share_prefix), or it is not a bare GPT in one process (a DDP/FSDP
    wrapper expects one forward per backward).
    """
    from .gpt import GPT

    if (type(model) is not GPT or not can_share_prefix(model.transformer)
            or (torch.distributed.is_available() and torch.distributed.is_initialized())):
        return None
    representatives, owner = shared_prompts(input_ids, prompt_lengths)
    if len(representatives) == len(owner):
        return None
    full_width = input_ids.shape[1]
    width = int((attention_mask.sum(dim=1) - prompt_lengths).max())            # Tc
    offsets = torch.arange(width + 1, device=input_ids.device)
    source = prompt_lengths[:, None] - 1 + offsets                             # [B, 1 + Tc] row positions
    take = predicted.gather(1, source.clamp(max=full_width - 1)) & (source < full_width)
    if int(take.sum()) != int(predicted.sum()):
        return None                                                            # a scored position inside a prompt
    lengths = prompt_lengths[representatives]                                  # [P]
    prefix_ids = input_ids[representatives, :int(lengths.max())]               # right-padded past each length
    tokens = source[:, 1:]                                                     # continuation token positions
    continuation_ids = torch.where(tokens < full_width, input_ids.gather(1, tokens.clamp(max=full_width - 1)), 0)
    cache = SharedPrefixCache(lengths, owner)
    prefix_hidden, _ = model.transformer(prefix_ids, kv_cache=cache)            # [P, Pmax, d]
    cache.continue_rows()
    hidden, _ = model.transformer(continuation_ids, kv_cache=cache)             # [B, Tc, d]
    last_prompt = prefix_hidden[torch.arange(len(lengths), device=lengths.device), lengths - 1][owner]
    hidden = torch.cat([last_prompt[:, None], hidden], dim=1)                  # [B, 1 + Tc, d] at `source`
    return hidden[take]


def predicted_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     predicted: torch.Tensor, prompt_lengths: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [M, V], final hidden states [M, d]) at the `predicted` positions, row-major: the shared
    prompt forward when `prompt_lengths` is given and it applies, else the model's plain forward."""
    states = (shared_prefix_states(model, input_ids, attention_mask, predicted, prompt_lengths)
              if prompt_lengths is not None else None)
    if states is not None:
        return model.lm_head(states), states
    output = model(input_ids, attention_mask=attention_mask, logits_mask=predicted, return_output=True)
    return output.logits, output.hidden_states[predicted]
