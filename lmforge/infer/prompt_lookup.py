"""Prompt-lookup decoding: speculative decoding whose draft model is a search in the text so far.

A decode step on a CPU reads every weight once whatever the number of tokens it processes, so up
to a few dozen tokens cost about what one does. Speculative decoding spends that: guess the next
few tokens cheaply, feed them all in one forward, and keep the longest prefix the model itself
would have produced greedily. The output is exactly greedy decoding's; only the number of
forwards changes. Prompt lookup (Saxena 2023; `prompt_lookup_num_tokens` in transformers) takes
the guess from the sequence itself: if its last n tokens occurred earlier (in the prompt or the
answer), the tokens that followed them then are the draft. Answers that restate their question,
quote a document or repeat a pattern accept several tokens per step.

    draft = lookup_draft(prompt_ids + generated_ids, max_ngram=3, max_draft=4)
    # one forward over [last token, *draft]; predicted[j] = argmax after the first j draft tokens
    keep = accepted_length(draft, predicted)      # emit predicted[:keep + 1]

The engine (`Engine(..., prompt_lookup=4)`) calls `prompt_lookup_drafts` and `decode_with_drafts`
instead of its one-token decode step whenever a greedy row found a draft.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch


def lookup_draft(tokens: list[int], max_ngram: int = 3, max_draft: int = 4) -> list[int]:
    """Up to `max_draft` tokens that followed the latest earlier occurrence of the sequence's last
    n tokens (the longest n <= max_ngram that occurred before); [] when none did."""
    length = len(tokens)
    if length < 2 or max_draft < 1:
        return []
    last = tokens[-1]
    for n in range(min(max_ngram, length - 1), 0, -1):
        tail = tokens[length - n:]
        # Candidate ends: earlier positions holding the last token (cheap int test first).
        for end in range(length - 2, n - 2, -1):
            if tokens[end] == last and tokens[end - n + 1:end + 1] == tail:
                return tokens[end + 1:end + 1 + max_draft]
    return []


def accepted_length(draft: list[int], predicted: list[int]) -> int:
    """How many draft tokens greedy decoding agrees with. predicted[j] [len(draft) + 1] is the
    model's argmax after the fed token and the first j draft tokens."""
    kept = 0
    while kept < len(draft) and draft[kept] == predicted[kept]:
        kept += 1
    return kept


def prompt_lookup_drafts(engine: Any, sequences: list[Any]) -> list[list[int] | None]:
    """Prompt-lookup drafts: a list per greedy, unpenalised row without log-probs (None for the
    others, which are sampled as usual), cut so the accepted tokens fit max_new_tokens and
    every row's padded positions fit the context."""
    room = engine.context_length - int(engine.cache.lengths[[s.row for s in sequences]].max()) - 1
    drafts: list[list[int] | None] = []
    for sequence in sequences:
        params = sequence.params
        if not params.greedy or params.penalised or params.logprobs or params.top_logprobs:
            drafts.append(None)
            continue
        limit = min(engine.prompt_lookup, room, params.max_new_tokens - len(sequence.token_ids) - 1)
        drafts.append(lookup_draft(sequence.prompt_ids + sequence.token_ids, max_draft=limit) if limit > 0 else [])
    return drafts


def decode_with_drafts(engine: Any, sequences: list[Any], drafts: list[list[int] | None]) -> None:
    """One forward over [last token, *draft] per row (right-padded): greedy rows keep the draft
    prefix their own argmax agrees with plus the next argmax; the other rows sample position 0."""
    fed = [[s.next_token, *(d or [])] for s, d in zip(sequences, drafts)]
    width = max(len(f) for f in fed)
    ids = torch.zeros(len(fed), width, dtype=torch.long)
    mask = torch.zeros(len(fed), width, dtype=torch.long)
    for i, tokens in enumerate(fed):
        ids[i, :len(tokens)], mask[i, :len(tokens)] = torch.tensor(tokens), 1
    rows = torch.tensor([s.row for s in sequences], device=engine.device)
    start = engine.cache.lengths[rows].clone()
    real = mask.bool().to(engine.device)
    with engine.routed([s.adapter for s in sequences]):
        hidden = engine.model.hidden_states(ids.to(engine.device), attention_mask=mask.to(engine.device),
                                            kv_cache=engine.cache, cache_rows=rows)
    logits = engine.model.lm_head(hidden[real])                          # [M, V], row-major
    offsets = [0, *itertools.accumulate(len(f) for f in fed)]
    sampled = [i for i, d in enumerate(drafts) if d is None]
    if sampled:
        index = torch.tensor(sampled, device=engine.device)
        engine._sample([sequences[i] for i in sampled], logits[[offsets[i] for i in sampled]], rows[index])
    predicted = logits.argmax(dim=-1).tolist()
    for i, (sequence, draft) in enumerate(zip(sequences, drafts)):
        if draft is None:
            continue
        row_predicted = predicted[offsets[i]:offsets[i + 1]]
        kept = accepted_length(draft, row_predicted)
        engine.cache.lengths[sequence.row] = start[i] + 1 + kept      # drop the rejected drafts' keys/values
        engine.stats.draft_tokens += len(draft)
        engine.stats.accepted_draft_tokens += kept
        for token in row_predicted[:kept + 1]:
            try:
                engine._accept(sequence, token, None)
            except Exception as error:
                engine._fail(sequence, error)
            if sequence.finish_reason is not None:
                break
