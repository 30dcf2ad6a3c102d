"""Request bookkeeping for the engine: one `Sequence` per prompt in flight, its result, the totals.

A `Sequence` is written only by the thread that is stepping the engine; consumers read its
`deltas` (new text), `finish_reason` and, at the end, `result()`.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from ..errors import ContextLengthError, UserError
from .sampling import SamplingParams
from .text import TextStream


class GenerationError(RuntimeError):
    """Generating one sequence failed inside the engine (a bug or a broken model, not bad input).

    The other sequences of the batch are not affected; this is raised to the failed sequence's
    consumer (`Engine.generate`, `Engine.stream`) with the original exception as its cause.
    """


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
    shared_prefill_tokens: int = 0   # prompt tokens not prefilled because an identical prompt was (copied rows)
    generated_tokens: int = 0        # sampled
    cancelled: int = 0               # sequences dropped because their consumer went away
    failed: int = 0                  # sequences ended by an error inside the engine (finish_reason "error")
    peak_running: int = 0            # most sequences decoded together in one forward
    compile_seconds: float = 0.0     # start-up cost of the compiled decode step
    draft_tokens: int = 0            # prompt-lookup tokens proposed (prompt_lookup.py)
    accepted_draft_tokens: int = 0   # ... and kept (each saves one decode forward)


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
    group: Hashable = 0                  # the request it belongs to: rows are shared fairly between groups
    adapter: int = 0                     # which LoRA adapter its rows run with (0 = the base model)
    row: int | None = None               # KV-cache row while running
    next_token: int | None = None        # sampled but not yet fed to the model
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    completion_tokens: int = 0
    stop_token_id: int | None = None     # the end token that finished it (not in token_ids)
    finish_reason: str | None = None
    cancelled: bool = False
    error: BaseException | None = None   # what failed it, when finish_reason is "error"
    deltas: collections.deque = field(default_factory=collections.deque)   # text not yet consumed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def raise_if_failed(self) -> None:
        """Raise GenerationError if an error inside the engine ended this sequence."""
        if self.finish_reason == "error":
            raise GenerationError(f"generating sequence {self.id} failed: {self.error!r}") from self.error

    def result(self) -> GenerationResult:
        return GenerationResult(text=self.text.text, token_ids=list(self.token_ids),
                                logprobs=list(self.logprobs) if self.params.logprobs else None,
                                top_logprobs=list(self.top_logprobs) if self.params.top_logprobs else None,
                                finish_reason=self.finish_reason or "length", prompt_tokens=len(self.prompt_ids),
                                completion_tokens=self.completion_tokens)


def prepare_prompt(tokenizer: Any, prompt: str | list[int], max_new_tokens: int, context_length: int,
                   vocab_size: int, context_policy: str) -> list[int]:
    """Tokenize and apply the context policy: the prompt plus max_new_tokens must fit the context."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise UserError("a prompt must be a string or a list of token ids; fix the prompt")
    if any(not 0 <= t < vocab_size for t in ids):
        raise UserError(f"the prompt has token ids outside the vocabulary [0, {vocab_size}); fix the token ids")
    if not ids:
        # An empty prompt starts a fresh document: condition on the document separator (or BOS).
        starts = [t for t in (getattr(tokenizer, "eot_id", None), getattr(tokenizer, "bos_id", None))
                  if isinstance(t, int)]
        if not starts:
            raise UserError("the prompt is empty and the tokenizer has no end-of-text or BOS token to start "
                            "from; give a non-empty prompt")
        ids = starts[:1]
    budget = context_length - max_new_tokens
    if budget < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the context of "
                        f"{context_length} tokens; lower max_new_tokens")
    if len(ids) > budget:
        if context_policy == "error":
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens, but with max_new_tokens={max_new_tokens} only {budget} fit "
                f"in the context of {context_length} tokens; shorten the prompt, lower max_new_tokens, "
                "or use context_policy='truncate_left'", len(ids), max_new_tokens, context_length)
        ids = ids[-budget:]
    return ids
