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
a long one. `generate` and `stream` just call `step()` until their sequences finish; the HTTP
server calls it from one background thread (lmforge/serve/scheduler.py). `step()` holds a lock,
so several threads may stream from one engine at once: whoever steps advances everyone.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..errors import ContextLengthError, UserError
# The tokenizer layer owns the stop tokens (SFT masks use them too); re-exported here.
from ..tokenizer.chat_template import END_TOKENS, default_stop_token_ids, render_chat_ids  # noqa: F401
from .sampling import BatchSampler, SamplingParams
from .static_decode import StaticDecodeStep
from .text import TextStream

CONTEXT_POLICIES = ("truncate_left", "error")
# The KV cache holds max_batch_size x context positions per layer; long-context models (SmolLM2:
# 8192) would need gigabytes for a full batch, so the served context is capped unless asked.
DEFAULT_MAX_SEQ_LEN = 2048


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]                 # generated tokens, without a final stop token
    logprobs: list[float] | None         # log p(token) for each of token_ids, when asked for
    top_logprobs: list[list[tuple[int, float]]] | None   # per token: the k most likely (id, log p), when asked for
    finish_reason: str                   # "stop" (stop token or string) | "length" (max_new_tokens or context)
                                         # ("cancelled" / "error" only reach the server's own handlers)
    prompt_tokens: int                   # after any left truncation
    completion_tokens: int               # every sampled token, a final stop token included


@dataclass
class EngineStats:
    """Running totals, for /health, benchmarks and tests."""

    steps: int = 0
    prompt_tokens: int = 0           # prefilled
    generated_tokens: int = 0        # sampled
    cancelled: int = 0               # sequences dropped because their consumer went away
    peak_running: int = 0            # most sequences decoded together in one forward
    compile_seconds: float = 0.0     # start-up cost of the compiled decode step


@dataclass
class Sequence:
    """One request moving through the engine. Its fields are written only by the stepping thread."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    text: TextStream
    seed: int
    on_update: Callable[["Sequence"], None] | None = None   # called after each step that changed it
    row: int | None = None               # KV-cache row while running
    next_token: int | None = None        # sampled but not yet fed to the model
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    deltas: collections.deque = field(default_factory=collections.deque)   # text not yet consumed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> GenerationResult:
        return GenerationResult(text=self.text.text, token_ids=list(self.token_ids),
                                logprobs=list(self.logprobs) if self.params.logprobs else None,
                                top_logprobs=list(self.top_logprobs) if self.params.top_logprobs else None,
                                finish_reason=self.finish_reason or "length", prompt_tokens=len(self.prompt_ids),
                                completion_tokens=self.completion_tokens)


class Engine:
    """Batched generation for any causal LM with a KV cache (`lmforge.load` returns one).

    max_batch_size: KV-cache rows, i.e. sequences decoded together; more wait in a queue.
    context_policy: what a too-long prompt gets: "truncate_left" (keep its last tokens) or "error".
    max_seq_len: the context served (prompt + new tokens); default min(model's, 2048).
    max_prefill_tokens: padded prompt tokens prefilled per step, so that a burst of long prompts
        does not stall the running sequences for long.
    compile: decode with the torch.compile'd static step (static_decode.py); compiles at start.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch_size: int = 16,
                 context_policy: str = "truncate_left", max_seq_len: int | None = None,
                 max_prefill_tokens: int = 4096, compile: bool = False) -> None:
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
        self.device = next(model.parameters()).device
        self.cache = model.new_kv_cache(max_batch_size, self.context_length)
        self.sampler = BatchSampler(max_batch_size, model.config.vocab_size, self.device)
        self.end_token_ids = default_stop_token_ids(tokenizer)
        self.slots: list[Sequence | None] = [None] * max_batch_size
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.stats = EngineStats()
        self.static_step = None
        if compile:
            start = time.perf_counter()
            self.static_step = StaticDecodeStep(model, self.cache, compile=True)
            with eval_mode(model), torch.inference_mode():
                self.static_step(torch.zeros(max_batch_size, dtype=torch.long, device=self.device))   # compile now
            self.stats.compile_seconds = time.perf_counter() - start
        self._lock = threading.RLock()
        self._ids = itertools.count()

    # ----------------------------------------------------------------------------- public API

    def generate(self, prompts: list[str] | list[list[int]] | str, params: SamplingParams | None = None
                 ) -> list[GenerationResult]:
        """Generate for several prompts (text or token ids) at once, in one batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        sequences = [self.submit(prompt, params) for prompt in prompts]
        try:
            while not all(sequence.finished for sequence in sequences):
                self.step()
        finally:
            for sequence in sequences:
                self.cancel(sequence)
        return [sequence.result() for sequence in sequences]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text increments as they are generated (whole characters only)."""
        return self.stream_sequence(self.submit(prompt, params))

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[str]:
        """Stream the assistant's reply to a conversation rendered with the model's chat template.

        The prompt is token ids from `render_chat_ids`: message text is encoded as plain text, so a
        message holding "<|im_end|>" cannot fake a turn."""
        prompt_ids, _ = render_chat_ids(self.tokenizer, messages, add_generation_prompt=True)
        return self.stream(prompt_ids, params)

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               on_update: Callable[[Sequence], None] | None = None) -> Sequence:
        """Queue a request; it starts at the next `step()`. Raises UserError for bad input."""
        params = (params or SamplingParams()).validate()
        prompt_ids = self.prepare_prompt(prompt, params.max_new_tokens)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,)))
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.end_token_ids
        sequence = Sequence(id=next(self._ids), prompt_ids=prompt_ids, params=params, stop_ids=stop_ids,
                            text=TextStream(self.tokenizer, prompt_ids, params.stop), seed=seed, on_update=on_update)
        with self._lock:
            self.waiting.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence (e.g. its client went away); its row is freed at the next step."""
        sequence.cancelled = True

    def stream_sequence(self, sequence: Sequence) -> Iterator[str]:
        """Yield the text of a submitted sequence as it is generated; closing the iterator cancels it."""
        try:
            while True:
                while sequence.deltas:
                    yield sequence.deltas.popleft()
                if sequence.finished:
                    return
                self.step()
        finally:
            self.cancel(sequence)

    def prepare_prompt(self, prompt: str | list[int], max_new_tokens: int) -> list[int]:
        """Tokenize and apply the context policy: the prompt plus max_new_tokens must fit the context."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise UserError("a prompt must be a string or a list of token ids; fix the prompt")
        vocab_size = self.model.config.vocab_size
        if any(not 0 <= t < vocab_size for t in ids):
            raise UserError(f"the prompt has token ids outside the vocabulary [0, {vocab_size}); fix the token ids")
        if not ids:
            # An empty prompt starts a fresh document: condition on the document separator (or BOS).
            starts = [t for t in (getattr(self.tokenizer, "eot_id", None), getattr(self.tokenizer, "bos_id", None))
                      if isinstance(t, int)]
            if not starts:
                raise UserError("the prompt is empty and the tokenizer has no end-of-text or BOS token to start "
                                "from; give a non-empty prompt")
            ids = starts[:1]
        budget = self.context_length - max_new_tokens
        if budget < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the context of "
                            f"{self.context_length} tokens; lower max_new_tokens")
        if len(ids) > budget:
            if self.context_policy == "error":
                raise ContextLengthError(
                    f"the prompt has {len(ids)} tokens, but with max_new_tokens={max_new_tokens} only {budget} fit "
                    f"in the context of {self.context_length} tokens; shorten the prompt, lower max_new_tokens, "
                    "or use context_policy='truncate_left'", len(ids), max_new_tokens, self.context_length)
            ids = ids[-budget:]
        return ids

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
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            if decoding:
                self._decode(decoding)
            changed += admitted + decoding
            if admitted or decoding:
                self.stats.steps += 1
                self.stats.peak_running = max(self.stats.peak_running, len(decoding))
        for sequence in changed:
            if sequence.on_update is not None:
                sequence.on_update(sequence)
        return bool(changed)

    def abort_all(self, reason: str = "error") -> None:
        """Finish every waiting and running sequence with `reason` (after a failed step)."""
        with self._lock:
            sequences = list(self.waiting) + [s for s in self.slots if s is not None]
            self.waiting.clear()
            for sequence in sequences:
                self._finish(sequence, reason)
        for sequence in sequences:
            if sequence.on_update is not None:
                sequence.on_update(sequence)

    def _drop_cancelled(self) -> list[Sequence]:
        dropped = [s for s in self.waiting if s.cancelled]
        if dropped:
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        dropped += [s for s in self.slots if s is not None and s.cancelled]
        self.stats.cancelled += len(dropped)
        for sequence in dropped:
            self._finish(sequence, "cancelled")
        return dropped

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences into free rows, up to a prefill token budget per step."""
        admitted, tokens = [], 0
        free_rows = [row for row, slot in enumerate(self.slots) if slot is None]
        while self.waiting and free_rows:
            length = len(self.waiting[0].prompt_ids)
            if admitted and (len(admitted) + 1) * max(tokens, length) > self.max_prefill_tokens:
                break
            sequence = self.waiting.popleft()
            sequence.row = free_rows.pop(0)
            self.slots[sequence.row] = sequence
            self.sampler.assign(sequence.row, sequence.params, sequence.prompt_ids, sequence.seed)
            admitted.append(sequence)
            tokens = max(tokens, length)
        return admitted

    def _prefill(self, sequences: list[Sequence]) -> None:
        """Run the prompts of newly admitted sequences (right-padded to the longest) and sample."""
        longest = max(len(s.prompt_ids) for s in sequences)
        ids = torch.zeros(len(sequences), longest, dtype=torch.long)
        mask = torch.zeros(len(sequences), longest, dtype=torch.long)
        for index, sequence in enumerate(sequences):
            ids[index, :len(sequence.prompt_ids)] = torch.tensor(sequence.prompt_ids)
            mask[index, :len(sequence.prompt_ids)] = 1
        rows = torch.tensor([s.row for s in sequences], device=self.device)
        self.cache.reset(rows)
        last = torch.tensor([len(s.prompt_ids) - 1 for s in sequences], device=self.device)
        self.stats.prompt_tokens += int(mask.sum())
        logits = self._forward(ids.to(self.device), mask.to(self.device), rows, last)
        self._sample(sequences, logits, rows)

    def _decode(self, sequences: list[Sequence]) -> None:
        """Feed each sequence's last sampled token and sample the next one, all rows in one forward."""
        ids = torch.tensor([s.next_token for s in sequences], device=self.device)
        rows = torch.tensor([s.row for s in sequences], device=self.device)
        if self.static_step is not None:
            tokens = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
            tokens[rows] = ids
            hidden = self.static_step(tokens)[rows]
            self.cache.lengths[rows] += 1
            logits = self.model.lm_head(hidden)
        else:
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
        row_list = [s.row for s in sequences]
        tokens, logprobs, top = self.sampler.sample(logits, rows, row_list)
        self.sampler.observe(rows, tokens, row_list)
        token_list = tokens.tolist()
        logprob_list = logprobs.tolist() if logprobs is not None else [None] * len(sequences)
        if top is not None:
            top_list = [list(zip(ids, values)) for ids, values in zip(top[1].tolist(), top[0].tolist())]
        else:
            top_list = [None] * len(sequences)
        for sequence, token, logprob, alternatives in zip(sequences, token_list, logprob_list, top_list):
            self._accept(sequence, token, logprob, alternatives)

    def _accept(self, sequence: Sequence, token: int, logprob: float | None,
                alternatives: list[tuple[int, float]] | None = None) -> None:
        """Bookkeeping for one sampled token: text, stop conditions, limits."""
        sequence.completion_tokens += 1
        self.stats.generated_tokens += 1
        if token in sequence.stop_ids:
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
        tail = sequence.text.finish()
        if tail:
            sequence.deltas.append(tail)
        sequence.finish_reason = reason
        sequence.next_token = None
        if sequence.row is not None:
            self.slots[sequence.row] = None
            sequence.row = None


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
