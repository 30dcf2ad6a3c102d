"""The three lm-eval request types, answered with batched forwards and lmforge's generation engine.

    scorer = Scorer(model)
    scorer.loglikelihood([(context_ids, continuation_ids), ...])   # -> [(log p(continuation), is_greedy)]
    scorer.loglikelihood_rolling([doc_ids, ...], prefix_token)      # -> [log p(doc)], every token once
    generate_until(engine, [prompt_ids, ...], until=["\\n\\n"], max_tokens=256)   # -> [text]

Log-likelihoods: requests are grouped by context and sorted by length (longest first, so padding
is small and an out-of-memory error comes first). A context with several continuations (the
choices of one question) is prefilled once into a KV cache whose rows are then copied, one per
choice, so the choices share the prefix instead of recomputing it; a one-token continuation
needs no second forward at all. A context with one continuation is a single padded forward.
Either way the output layer (vocabulary-sized: a fifth of SmolLM2's weights) runs only at the
positions that predict a continuation token.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from ..errors import UserError
from ..model.kv_cache import KVCache

Pair = tuple[list[int], list[int]]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int, context_len: int = 1
                    ) -> Iterator[Pair]:
    """Split a document into (context, continuation) windows of at most max_len input tokens that
    predict every token exactly once, each with up to context_len - 1 earlier tokens of context.

    context_len=1 is lm-eval's choice (disjoint windows: fast, little context); a larger one
    (e.g. max_len // 2) slides the window with overlap, so later tokens keep more context.
    The first window is conditioned on `prefix_token` (the document separator)."""
    if not 1 <= context_len <= max_len:
        raise ValueError(f"context_len must be in [1, max_len={max_len}], not {context_len}")
    tokens = list(tokens)
    if not tokens:
        return
    predict_len = max_len - context_len + 1
    first = min(max_len, len(tokens))
    yield [prefix_token], tokens[:first]
    done = first
    while done < len(tokens):
        count = min(len(tokens) - done, predict_len)
        end = done + count
        window = tokens[max(end - max_len - 1, 0):end - 1]     # inputs; the last `count` predict
        yield window[:len(window) - (count - 1)], tokens[end - count:end]
        done = end


class Scorer:
    """Log-likelihoods of continuations under a causal LM (an lmforge GPT).

    max_length: tokens one forward may see (default: the model's context, at most 2048).
    batch_tokens: padded tokens per forward (KV-cache rows x length for shared prefixes).
    """

    def __init__(self, model: torch.nn.Module, max_length: int | None = None, batch_tokens: int = 8192,
                 max_rows: int = 64) -> None:
        self.model = model
        self.max_length = min(max_length or 2048, model.config.max_seq_len)
        self.batch_tokens, self.max_rows = batch_tokens, max_rows
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------------ public API

    @torch.inference_mode()
    def loglikelihood(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token | everything before), whether greedy decoding gives it)."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise UserError(f"request {index} has an empty continuation; every choice needs some text")
            if not context:
                raise ValueError("an empty context needs a prefix token (the caller adds it)")
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                                f"{self.max_length}-token context; shorten the choices")
            keep = self.max_length + 1 - len(continuation)       # as lm-eval: drop the oldest context
            groups.setdefault(tuple(context[-keep:]), []).append((index, list(continuation)))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        singles = [(members[0][0], list(context), members[0][1])
                   for context, members in groups.items() if len(members) == 1]
        shared = [(list(context), members) for context, members in groups.items() if len(members) > 1]
        singles.sort(key=lambda item: -(len(item[1]) + len(item[2])))
        shared.sort(key=lambda item: -(len(item[0]) + max(len(c) for _, c in item[1])))
        for batch in self._batches(singles, lambda item: len(item[1]) + len(item[2]), lambda item: 1):
            for index, value in zip((i for i, _, _ in batch), self._score_full(batch)):
                results[index] = value
        for batch in self._batches(shared, lambda item: len(item[0]) + max(len(c) for _, c in item[1]),
                                   lambda item: len(item[1])):
            for index, value in self._score_shared(batch):
                results[index] = value
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, documents: Sequence[Sequence[int]], prefix_token: int,
                              context_len: int = 1) -> list[float]:
        """log p(document) for each document, over rolling windows (every token predicted once)."""
        windows, owner = [], []
        for index, tokens in enumerate(documents):
            for window in rolling_windows(tokens, prefix_token, self.max_length, context_len):
                windows.append(window)
                owner.append(index)
        totals = [0.0] * len(documents)
        for index, (logprob, _) in zip(owner, self.loglikelihood(windows)):
            totals[index] += logprob
        return totals

    # ------------------------------------------------------------------------ batching

    def _batches(self, items: list, length, rows) -> Iterator[list]:
        """Consecutive runs of (length-sorted) items whose padded size fits the budgets."""
        batch: list = []
        longest = count = 0
        for item in items:
            new_longest, new_count = max(longest, length(item)), count + rows(item)
            if batch and (new_longest * new_count > self.batch_tokens or new_count > self.max_rows):
                yield batch
                batch, new_longest, new_count = [], length(item), rows(item)
            batch.append(item)
            longest, count = new_longest, new_count
        if batch:
            yield batch

    def _score(self, hidden: torch.Tensor, targets: list[list[int]]) -> list[tuple[float, bool]]:
        """hidden [N, d] at the positions that predict the concatenated targets -> one result per target list."""
        logits = self.model.lm_head(hidden).float()                                     # [N, V]
        logprobs = torch.log_softmax(logits, dim=-1)
        flat = torch.tensor([t for target in targets for t in target], device=self.device)
        token_lp = logprobs.gather(1, flat[:, None])[:, 0].double()                     # [N]
        greedy = (logits.argmax(dim=-1) == flat)
        segment = torch.repeat_interleave(torch.arange(len(targets), device=self.device),
                                          torch.tensor([len(t) for t in targets], device=self.device))
        sums = torch.zeros(len(targets), dtype=torch.float64, device=self.device).index_add_(0, segment, token_lp)
        misses = torch.zeros(len(targets), dtype=torch.long, device=self.device).index_add_(0, segment,
                                                                                           (~greedy).long())
        return [(float(s), bool(m == 0)) for s, m in zip(sums.tolist(), misses.tolist())]

    def _score_full(self, batch: list[tuple[int, list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One padded forward over context + continuation[:-1] per row."""
        inputs = [context + continuation[:-1] for _, context, continuation in batch]
        ids, mask = self._pad(inputs)
        hidden = self.model.hidden_states(ids, attention_mask=mask)                     # [B, T, d]
        rows, positions = [], []
        for row, (_, context, continuation) in enumerate(batch):
            rows += [row] * len(continuation)
            positions += range(len(context) - 1, len(context) - 1 + len(continuation))
        picked = hidden[torch.tensor(rows, device=self.device), torch.tensor(positions, device=self.device)]
        return self._score(picked, [continuation for _, _, continuation in batch])

    def _score_shared(self, batch: list[tuple[list[int], list[tuple[int, list[int]]]]]
                      ) -> list[tuple[int, tuple[float, bool]]]:
        """Prefill each context once, copy its KV-cache row to one row per continuation, then feed
        every continuation[:-1] over those rows. Cache rows are ordered by continuation length and
        the continuations go in runs of similar length (a run ends where the length halves), so
        a long choice does not pad every short one to its width."""
        members = [(group, index, continuation) for group, (_, conts) in enumerate(batch) for index, continuation in conts]
        members.sort(key=lambda member: -len(member[2]))                       # row r = members[r]
        first_row: dict[int, int] = {}
        for row, (group, _, _) in enumerate(members):
            first_row.setdefault(group, row)
        contexts = [context for context, _ in batch]
        longest_tail = len(members[0][2]) - 1
        cache = None
        if longest_tail > 0:
            config = self.model.config
            cache = KVCache(config.n_layers, len(members), max(map(len, contexts)) + longest_tail, config.n_kv_heads,
                            config.head_dim, next(self.model.parameters()).dtype, self.device)
        ids, mask = self._pad(contexts)
        group_rows = torch.tensor([first_row[g] for g in range(len(batch))], device=self.device)
        hidden = self.model.hidden_states(ids, attention_mask=mask, kv_cache=cache,
                                          cache_rows=group_rows if cache is not None else None)
        last = hidden[torch.arange(len(batch), device=self.device),
                      torch.tensor([len(c) - 1 for c in contexts], device=self.device)]     # [G, d]
        member_group = torch.tensor([g for g, _, _ in members], device=self.device)
        first = last[member_group]                                                       # [R, d]
        tails: list[torch.Tensor | None] = [None] * len(members)
        if cache is not None:
            cache.copy_rows(group_rows[member_group], torch.arange(len(members), device=self.device))
            for start, end in self._length_runs([len(c) - 1 for _, _, c in members]):
                tail_ids, tail_mask = self._pad([c[:-1] for _, _, c in members[start:end]])
                out = self.model.hidden_states(tail_ids, attention_mask=tail_mask, kv_cache=cache,
                                               cache_rows=torch.arange(start, end, device=self.device))
                for row in range(start, end):
                    tails[row] = out[row - start, :len(members[row][2]) - 1]
        pieces, targets = [], []
        for row, (_, _, continuation) in enumerate(members):
            pieces.append(first[row:row + 1])
            if tails[row] is not None:
                pieces.append(tails[row])
            targets.append(continuation)
        scored = self._score(torch.cat(pieces), targets)
        return [(index, value) for (_, index, _), value in zip(members, scored)]

    @staticmethod
    def _length_runs(lengths: list[int]) -> list[tuple[int, int]]:
        """[start, end) runs of descending `lengths` (> 0 only) in which no length is under half the
        run's first: padding inside a run wastes less than half of its tokens."""
        runs, start = [], 0
        for index, length in enumerate(lengths + [0]):
            if index > start and (length == 0 or 2 * length < lengths[start]):
                runs.append((start, index))
                start = index
            if length == 0:
                break
        return runs

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Right-padded ids [B, T] and mask [B, T] (None when no row is padded: SDPA's fast causal path)."""
        longest = max(map(len, rows))
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[index, :len(row)] = 1
        padded = bool((mask == 0).any())
        return ids.to(self.device), (mask.to(self.device) if padded else None)


def generate_until(engine: Any, prompts: Sequence[list[int] | str], until: Sequence[str], max_tokens: int,
                   temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """Generate for every prompt with the engine (continuous batching) and cut each text at the first
    stop string, as lm-eval does. Greedy by default; temperature > 0 samples (seeded per prompt)."""
    from ..infer.sampling import SamplingParams

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))   # long prompts prefill together
    params = [SamplingParams(max_new_tokens=max_tokens, temperature=temperature, stop=list(until),
                             seed=None if seed is None else seed + i) for i in order]
    group = engine.new_group()
    sequences = [engine.submit(prompts[i], p, group=group) for i, p in zip(order, params)]
    try:
        while not all(s.finished for s in sequences):
            engine.step()
    finally:
        for sequence in sequences:
            engine.cancel(sequence)
    texts: list[str] = [""] * len(prompts)
    for i, sequence in zip(order, sequences):
        sequence.raise_if_failed()
        text = sequence.result().text
        for stop in until:
            text = text.split(stop)[0]
        texts[i] = text
    return texts
