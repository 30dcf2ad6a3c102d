"""The generation engine: prefill, then batched incremental decoding over one KV cache.

    engine = Engine(model, tokenizer, max_batch_size=16)
    [result] = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=32))
    for piece in engine.stream("Once upon a time", SamplingParams(temperature=0.8)):
        print(piece, end="")

The KV cache has `max_batch_size` rows. Each request ("sequence") owns one row while it runs.
`step()` is the whole scheduler:

    1. admit waiting sequences into free rows and prefill their prompts (one right-padded forward),
    2. decode one token for every running sequence (one [n, 1] forward over their rows),
    3. sample all next tokens at once, stream their text, and free the rows of finished sequences.

Sequences join and leave between steps (continuous batching), so a short request never waits for
a long one. Free rows go to the request ("group") holding the fewest rows (scheduling.py), so a
request with many prompts cannot hold every row while another waits. `generate` and `stream`
just call `step()` until their sequences finish; the HTTP server calls it from one background
thread (lmforge/serve/scheduler.py). `step()` holds a lock, so several threads may stream from
one engine at once: whoever steps advances everyone.

An exception while assigning, prefilling, sampling or accepting one row ends that sequence alone
(finish_reason "error"; its consumer gets a GenerationError). Only a failed decode forward, which
touches every row, propagates out of `step()`.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from typing import Any, Callable, Hashable, Iterator

import torch

from ..errors import UserError
# The tokenizer layer owns the stop tokens (SFT masks use them too); re-exported here.
from ..tokenizer.chat_template import END_TOKENS, default_stop_token_ids, render_chat_ids  # noqa: F401
# Request bookkeeping lives in requests.py; these names stay importable from here.
from .requests import EngineStats, GenerationError, GenerationResult, Sequence, prepare_prompt  # noqa: F401
from .sampling import BatchSampler, SamplingParams
from .prompt_lookup import decode_with_drafts, prompt_lookup_drafts
from .scheduling import FairQueue
from .static_decode import StaticDecodeStep
from .text import TextStream

CONTEXT_POLICIES = ("truncate_left", "error")
# The KV cache holds max_batch_size x context positions per layer; long-context models (SmolLM2:
# 8192) would need gigabytes for a full batch, so the served context is capped unless asked.
DEFAULT_MAX_SEQ_LEN = 2048

log = logging.getLogger("lmforge.infer")


class Engine:
    """Batched generation for any causal LM with a KV cache (`lmforge.load` returns one).

    max_batch_size: KV-cache rows, i.e. sequences decoded together; more wait in a queue.
    context_policy: what a too-long prompt gets: "truncate_left" (keep its last tokens) or "error".
    max_seq_len: the context served (prompt + new tokens); default min(model's, 2048).
    max_prefill_tokens: padded prompt tokens prefilled per step, so that a burst of long prompts
        does not stall the running sequences for long.
    compile: decode with the torch.compile'd static step (static_decode.py); compiles at start.
    prompt_lookup: draft up to this many tokens per step for greedy rows by prompt lookup
        (prompt_lookup.py) and verify them in the same forward; the tokens are exactly greedy
        decoding's. 0 = off. Not with `compile` (its step is one token per row).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch_size: int = 16,
                 context_policy: str = "truncate_left", max_seq_len: int | None = None,
                 max_prefill_tokens: int = 4096, compile: bool = False, prompt_lookup: int = 0) -> None:
        if context_policy not in CONTEXT_POLICIES:
            raise UserError(f"context_policy must be one of {CONTEXT_POLICIES}, not '{context_policy}'")
        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be >= 1, not {max_batch_size}")
        if getattr(model.config, "arch", "gpt") != "gpt":
            raise UserError("generation needs a causal LM (arch 'gpt'); a BERT model cannot generate text")
        # The caller's model keeps its mode: each step switches to eval (no dropout) and back, so a
        # trainer can roll out from the policy it trains (lmforge.train.context).
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context_policy = context_policy
        self.context_length = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, model.config.max_seq_len)
        self.max_prefill_tokens = max_prefill_tokens
        self.prompt_lookup = 0 if compile else max(0, int(prompt_lookup))
        self.device = next(model.parameters()).device
        self.cache = model.new_kv_cache(max_batch_size, self.context_length)
        self.sampler = BatchSampler(max_batch_size, model.config.vocab_size, self.device)
        self.end_token_ids = default_stop_token_ids(tokenizer)
        self.slots: list[Sequence | None] = [None] * max_batch_size
        self.waiting = FairQueue()
        self._running_groups: collections.Counter = collections.Counter()   # group -> rows it holds
        self.stats = EngineStats()
        self.adapters = getattr(model, "adapter_set", None)   # several LoRA adapters, one per request
        if self.adapters is not None:
            self.adapters.reserve(max_batch_size)
        self.static_step = None
        if compile:
            start = time.perf_counter()
            self.static_step = StaticDecodeStep(model, self.cache, compile=True)
            with eval_mode(model), torch.inference_mode(), self.routed([0] * max_batch_size, mixed=True):
                self.static_step(torch.zeros(max_batch_size, dtype=torch.long, device=self.device))   # compile now
            self.stats.compile_seconds = time.perf_counter() - start
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._groups = itertools.count(1)

    # ----------------------------------------------------------------------------- public API

    def generate(self, prompts: list[str] | list[list[int]] | str, params: SamplingParams | None = None,
                 adapter: str | None = None) -> list[GenerationResult]:
        """Generate for several prompts (text or token ids) at once, in one batch (one group).

        Raises GenerationError if generating any of them failed inside the engine."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        group = self.new_group()
        sequences: list[Sequence] = []
        try:
            for prompt in prompts:
                sequences.append(self.submit(prompt, params, group=group, adapter=adapter))
            while not all(sequence.finished for sequence in sequences):
                self.step()
        finally:
            for sequence in sequences:   # also those queued before a later prompt was refused
                self.cancel(sequence)
        for sequence in sequences:
            sequence.raise_if_failed()
        return [sequence.result() for sequence in sequences]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               adapter: str | None = None) -> Iterator[str]:
        """Yield text increments as they are generated (whole characters only)."""
        return self.stream_sequence(self.submit(prompt, params, adapter=adapter))

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[str]:
        """Stream the assistant's reply to a conversation rendered with the model's chat template.

        The prompt is token ids from `render_chat_ids`: message text is encoded as plain text, so a
        message holding "<|im_end|>" cannot fake a turn."""
        prompt_ids, _ = render_chat_ids(self.tokenizer, messages, add_generation_prompt=True)
        return self.stream(prompt_ids, params)

    def new_group(self) -> int:
        """A fresh group id: pass it to `submit` for every sequence of one request."""
        return next(self._groups)

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               on_update: Callable[[Sequence], None] | None = None, group: Hashable | None = None,
               adapter: str | None = None) -> Sequence:
        """Queue a request; it starts at a later `step()`. Raises UserError for bad input.

        Sequences of one `group` (a request's prompts and choices) share the rows the fair
        scheduler gives that group; without one, the sequence is a group of its own. `adapter`
        names one of the model's LoRA adapters (None: the base model)."""
        params = (params or SamplingParams()).validate()
        adapter_id = self.adapter_id(adapter)
        prompt_ids = self.prepare_prompt(prompt, params.max_new_tokens)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,)))
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.end_token_ids
        sequence = Sequence(id=next(self._ids), prompt_ids=prompt_ids, params=params, stop_ids=stop_ids,
                            text=TextStream(self.tokenizer, prompt_ids, params.stop), seed=seed, on_update=on_update,
                            group=self.new_group() if group is None else group, adapter=adapter_id)
        with self._lock:
            self.waiting.append(sequence)
        return sequence

    def adapter_id(self, adapter: str | None) -> int:
        """0 for the base model, else the id of the named adapter (UserError if the model lacks it)."""
        if adapter is None:
            return 0
        if self.adapters is None:
            raise UserError(f"adapter '{adapter}' was asked for, but this model has no adapters loaded "
                            "(lmforge.peft.multi_lora.load_adapters; lmforge serve --adapter NAME=DIR)")
        return self.adapters.id_of(adapter)

    def routed(self, adapter_ids: list[int], mixed: bool = False) -> contextlib.AbstractContextManager:
        """A forward inside this block runs row b with adapter `adapter_ids[b]` (a no-op without adapters)."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.routed(adapter_ids, mixed=mixed)

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence (e.g. its client went away); its row is freed at the next step."""
        sequence.cancelled = True

    def stream_sequence(self, sequence: Sequence) -> Iterator[str]:
        """Yield the text of a submitted sequence as it is generated; closing the iterator cancels it.

        Raises GenerationError (after the text generated so far) if the sequence failed in the engine."""
        try:
            while True:
                while sequence.deltas:
                    yield sequence.deltas.popleft()
                if sequence.finished:
                    sequence.raise_if_failed()
                    return
                self.step()
        finally:
            self.cancel(sequence)

    def prepare_prompt(self, prompt: str | list[int], max_new_tokens: int) -> list[int]:
        """Tokenize and apply the context policy: the prompt plus max_new_tokens must fit the context."""
        return prepare_prompt(self.tokenizer, prompt, max_new_tokens, self.context_length,
                              self.model.config.vocab_size, self.context_policy)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(slot is not None for slot in self.slots)

    @property
    def running(self) -> int:
        return sum(slot is not None for slot in self.slots)

    # ---------------------------------------------------------------------------- scheduling

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler step (admit + prefill, decode, sample). Returns False when idle."""
        with self._lock, eval_mode(self.model):
            changed = self._drop_cancelled()
            decoding = [s for s in self.slots if s is not None and s.next_token is not None]
            admitted, refused = self._admit()
            if admitted:
                self._prefill(admitted)
            if decoding:
                self._decode(decoding)
            changed += refused + admitted + decoding
            if admitted or decoding:
                self.stats.steps += 1
                self.stats.peak_running = max(self.stats.peak_running, len(decoding))
        for sequence in changed:
            self._notify(sequence)
        return bool(changed)

    def abort_all(self, reason: str = "error", error: BaseException | None = None) -> None:
        """Finish every waiting and running sequence with `reason` (after a failed step: its `error`)."""
        with self._lock:
            sequences = list(self.waiting) + [s for s in self.slots if s is not None]
            self.waiting.clear()
            for sequence in sequences:
                sequence.error = error
                self._finish(sequence, reason)
        for sequence in sequences:
            self._notify(sequence)

    def _notify(self, sequence: Sequence) -> None:
        """Run the sequence's update callback; a callback that raises cancels its own sequence only."""
        if sequence.on_update is None:
            return
        try:
            sequence.on_update(sequence)
        except Exception:
            log.exception("the update callback of sequence %d failed; cancelling it", sequence.id)
            self.cancel(sequence)

    def _drop_cancelled(self) -> list[Sequence]:
        """Finish the sequences whose consumers went away (waiting or running)."""
        dropped = self.waiting.remove_if(lambda s: s.cancelled)
        dropped += [s for s in self.slots if s is not None and s.cancelled]
        self.stats.cancelled += len(dropped)
        for sequence in dropped:
            self._finish(sequence, "cancelled")
        return dropped

    def _admit(self) -> tuple[list[Sequence], list[Sequence]]:
        """Move the sequences the fair queue picks into free rows. Returns (admitted, failed to assign)."""
        free_rows = [row for row, slot in enumerate(self.slots) if slot is None]
        admitted, refused = [], []
        for sequence, row in zip(self.waiting.take(len(free_rows), self._running_groups, self.max_prefill_tokens),
                                 free_rows):
            try:
                self.sampler.assign(row, sequence.params, sequence.prompt_ids, sequence.seed)
            except Exception as error:   # e.g. a value the row tensors cannot hold: this sequence alone fails
                self._fail(sequence, error)
                refused.append(sequence)
                continue
            sequence.row = row
            self.slots[row] = sequence
            self._running_groups[sequence.group] += 1
            admitted.append(sequence)
        return admitted, refused

    def _prefill(self, sequences: list[Sequence]) -> None:
        """Run the prompts of newly admitted sequences (right-padded to the longest) and sample. If that
        forward fails, each prompt is retried alone (a prefill writes only its own cache rows)."""
        try:
            logits, rows = self._prefill_forward(sequences)
        except Exception as error:
            if len(sequences) == 1:
                self._fail(sequences[0], error)
                return
            log.warning("prefilling %d prompts together failed (%r); retrying them one by one", len(sequences), error)
            for sequence in sequences:
                self._prefill([sequence])
            return
        self._sample(sequences, logits, rows)

    def _prefill_forward(self, sequences: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill the admitted prompts; identical prompts (GRPO's G samples of one question, the
        choices of a request) for the same adapter run once and their cache rows are copied to the others."""
        first: dict[tuple[int, ...], int] = {}
        owner = [first.setdefault((s.adapter, *s.prompt_ids), index) for index, s in enumerate(sequences)]
        unique = sorted(set(owner))
        longest = max(len(sequences[i].prompt_ids) for i in unique)
        ids = torch.zeros(len(unique), longest, dtype=torch.long)
        mask = torch.zeros(len(unique), longest, dtype=torch.long)
        for index, sequence_index in enumerate(unique):
            prompt = sequences[sequence_index].prompt_ids
            ids[index, :len(prompt)] = torch.tensor(prompt)
            mask[index, :len(prompt)] = 1
        rows = torch.tensor([sequences[i].row for i in unique], device=self.device)
        self.cache.reset(rows)
        last = torch.tensor([len(sequences[i].prompt_ids) - 1 for i in unique], device=self.device)
        with self.routed([sequences[i].adapter for i in unique]):
            logits = self._forward(ids.to(self.device), mask.to(self.device), rows, last)
        self.stats.prompt_tokens += int(mask.sum())
        if len(unique) == len(sequences):
            return logits, rows
        position = {sequence_index: index for index, sequence_index in enumerate(unique)}
        copies = [i for i in range(len(sequences)) if owner[i] != i]
        self.cache.copy_rows(torch.tensor([sequences[owner[i]].row for i in copies], device=self.device),
                             torch.tensor([sequences[i].row for i in copies], device=self.device))
        self.stats.shared_prefill_tokens += sum(len(sequences[i].prompt_ids) for i in copies)
        picked = torch.tensor([position[owner[i]] for i in range(len(sequences))], device=self.device)
        return logits[picked], torch.tensor([s.row for s in sequences], device=self.device)

    def _decode(self, sequences: list[Sequence]) -> None:
        """Feed each sequence's last sampled token and sample the next one, all rows in one forward."""
        drafts = prompt_lookup_drafts(self, sequences) if self.prompt_lookup else None
        if drafts is not None and any(drafts):
            decode_with_drafts(self, sequences, drafts)
            return
        ids = torch.tensor([s.next_token for s in sequences], device=self.device)
        rows = torch.tensor([s.row for s in sequences], device=self.device)
        if self.static_step is not None:
            tokens = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
            tokens[rows] = ids
            with self.routed([0 if s is None else s.adapter for s in self.slots], mixed=True):
                hidden = self.static_step(tokens)[rows]
            self.cache.lengths[rows] += 1
            logits = self.model.lm_head(hidden)
        else:
            with self.routed([s.adapter for s in sequences]):
                logits = self._forward(ids[:, None], None, rows, None)
        self._sample(sequences, logits, rows)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor,
                 last: torch.Tensor | None) -> torch.Tensor:
        """ids [n, T] -> logits [n, V] at position `last` [n] (the final position when None)."""
        hidden = self.model.hidden_states(ids, attention_mask=mask, kv_cache=self.cache, cache_rows=rows)
        # Only the positions we sample from go through the (vocab-sized) output layer.
        hidden = hidden[:, -1] if last is None else hidden[torch.arange(len(ids), device=ids.device), last]
        return self.model.lm_head(hidden)

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor, rows: torch.Tensor) -> None:
        """Sample and accept one token per sequence; an exception fails only the sequence it comes from.
        If the batched sampler raises, each row is sampled again alone (seeded rows get their
        generators back first, so their draws stay reproducible) and only rows that raise alone fail."""
        saved = self.sampler.generator_states([s.row for s in sequences])
        try:
            picks = self._pick(sequences, logits, rows)
        except Exception as error:
            if len(sequences) == 1:
                self._fail(sequences[0], error)
                return
            log.warning("sampling %d rows together failed (%r); retrying them one by one", len(sequences), error)
            self.sampler.restore_generators(saved)
            picks = []
            for index, sequence in enumerate(sequences):
                try:
                    picks += self._pick([sequence], logits[index:index + 1], rows[index:index + 1])
                except Exception as row_error:
                    self._fail(sequence, row_error)
        for sequence, token, logprob, alternatives in picks:
            try:
                self._accept(sequence, token, logprob, alternatives)
            except Exception as error:
                self._fail(sequence, error)

    def _pick(self, sequences: list[Sequence], logits: torch.Tensor, rows: torch.Tensor
              ) -> list[tuple[Sequence, int, float | None, list[tuple[int, float]] | None]]:
        """(sequence, token, its log-prob, top alternatives) for each sequence."""
        picks = self.sampler.pick(logits, rows, [s.row for s in sequences])
        return [(sequence, *pick) for sequence, pick in zip(sequences, picks)]

    def _accept(self, sequence: Sequence, token: int, logprob: float | None,
                alternatives: list[tuple[int, float]] | None = None) -> None:
        """Bookkeeping for one sampled token: text, stop conditions, limits."""
        sequence.completion_tokens += 1
        self.stats.generated_tokens += 1
        if token in sequence.stop_ids:
            sequence.stop_token_id = token
            self._finish(sequence, "stop")
            return
        sequence.token_ids.append(token)
        if logprob is not None:
            sequence.logprobs.append(logprob)
        if alternatives is not None and sequence.params.top_logprobs:
            sequence.top_logprobs.append(alternatives[:sequence.params.top_logprobs])
        delta = sequence.text.push(token)
        if delta:
            sequence.deltas.append(delta)
        if sequence.text.stopped:
            self._finish(sequence, "stop")
        elif len(sequence.token_ids) >= sequence.params.max_new_tokens:
            self._finish(sequence, "length")
        elif len(sequence.prompt_ids) + len(sequence.token_ids) > self.context_length:
            self._finish(sequence, "length")   # no cache position left to feed the token into
        else:
            sequence.next_token = token

    def _finish(self, sequence: Sequence, reason: str) -> None:
        if reason != "error":   # after an error the text stream may be what broke
            tail = sequence.text.finish()
            if tail:
                sequence.deltas.append(tail)
        sequence.finish_reason = reason
        sequence.next_token = None
        if sequence.row is not None:
            self.slots[sequence.row] = None
            sequence.row = None
            self._running_groups[sequence.group] -= 1
            if self._running_groups[sequence.group] <= 0:
                del self._running_groups[sequence.group]

    def _fail(self, sequence: Sequence, error: BaseException) -> None:
        """End one sequence after an exception inside the engine; the others keep going."""
        log.error("sequence %d failed; ending it alone with finish_reason 'error'", sequence.id, exc_info=error)
        sequence.error = error
        self.stats.failed += 1
        self._finish(sequence, "error")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in the mode it had."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()
