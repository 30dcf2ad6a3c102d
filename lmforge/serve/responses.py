"""The OpenAI response objects, whole and streamed, for one request's finished or running sequences.

`Reply` builds the JSON bodies (completion and chat formats, log-probs in each format's shape, usage);
`sse` turns a stream of chunks into server-sent events. Nothing here touches the engine's state.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

from ..infer.engine import Engine, Sequence
from .protocol import ApiError
from .scheduler import Event, Scheduler


@dataclasses.dataclass
class Submitted:
    """The sequences of one request and the queue their `Event`s arrive on."""

    events: asyncio.Queue
    sequences: list[Sequence]


def sse(chunks: AsyncIterator[dict], submitted: Submitted, scheduler: Scheduler) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`. A disconnect cancels."""
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ApiError as error:  # the status line is already sent: report the error in the stream
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': 'server_error'}})}\n\n"
        finally:
            # Runs when the stream ends and when the client disconnects mid-stream.
            for sequence in submitted.sequences:
                if not sequence.finished:
                    scheduler.cancel(sequence)
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Reply:
    """Builds the OpenAI response objects (whole or chunked) for one request."""

    def __init__(self, id_prefix: str, model_name: str, engine: Engine, choices_per_prompt: int = 1) -> None:
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.model_name, self.engine = model_name, engine
        self.choices_per_prompt = choices_per_prompt
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name, "choices": choices}

    def usage(self, sequences: list[Sequence]) -> dict:
        # Each prompt counts once, however many choices (n) were sampled from it, as with OpenAI.
        prompt = sum(len(s.prompt_ids) for s in sequences[::self.choices_per_prompt])
        completion = sum(s.completion_tokens for s in sequences)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _token_bytes(self, token: int) -> bytes:
        tokenizer = self.engine.tokenizer
        if hasattr(tokenizer, "id_to_bytes"):
            return tokenizer.id_to_bytes(token)
        return tokenizer.decode([token]).encode("utf-8")

    def _token_text(self, token: int) -> str:
        """The token as text; a token that is part of a UTF-8 character is shown as OpenAI does: bytes:\\xNN."""
        data = self._token_bytes(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)

    def _alternatives(self, sequence: Sequence, start: int, end: int) -> list[list[tuple[int, float]]]:
        """The top_logprobs alternatives of tokens start..end ([] per token when none were asked for)."""
        if not sequence.params.top_logprobs:
            return [[] for _ in range(end - start)]
        return sequence.top_logprobs[start:end]

    def _token_logprob(self, token: int, logprob: float) -> dict:
        return {"token": self._token_text(token), "logprob": logprob, "bytes": list(self._token_bytes(token))}

    def chat_logprobs(self, sequence: Sequence, start: int, end: int) -> dict:
        content = [{**self._token_logprob(token, logprob),
                    "top_logprobs": [self._token_logprob(*alternative) for alternative in alternatives]}
                   for token, logprob, alternatives in zip(sequence.token_ids[start:end], sequence.logprobs[start:end],
                                                           self._alternatives(sequence, start, end))]
        return {"content": content}

    def completion_logprobs(self, sequence: Sequence, start: int, end: int, offset: int) -> dict:
        tokens = [self._token_text(token) for token in sequence.token_ids[start:end]]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        top = None
        if sequence.params.top_logprobs:   # the legacy format: one {token text: log-prob} dict per position
            top = [{self._token_text(token): logprob for token, logprob in alternatives}
                   for alternatives in self._alternatives(sequence, start, end)]
        return {"tokens": tokens, "token_logprobs": list(sequence.logprobs[start:end]), "top_logprobs": top,
                "text_offset": offsets}

    # ------------------------------------------------------------------ whole responses

    def completion(self, sequences: list[Sequence], logprobs: bool) -> dict:
        choices = [{"index": index, "text": s.text.text, "finish_reason": s.finish_reason,
                    "logprobs": self.completion_logprobs(s, 0, len(s.token_ids), 0) if logprobs else None}
                   for index, s in enumerate(sequences)]
        return {**self._envelope("text_completion", choices), "usage": self.usage(sequences)}

    def chat(self, sequences: list[Sequence], logprobs: bool, tools: Any = None) -> dict:
        choices = [{"index": index, "message": {"role": "assistant", "content": s.text.text},
                    "finish_reason": s.finish_reason,
                    "logprobs": self.chat_logprobs(s, 0, len(s.token_ids)) if logprobs else None}
                   for index, s in enumerate(sequences)]
        if tools is not None:   # a reply that stopped at a call's arrow becomes OpenAI tool_calls
            from .tool_calls import split_tool_call

            for choice, s in zip(choices, sequences):
                content, call = split_tool_call(s.text.text, self.engine.tokenizer.decode(s.token_ids), tools)
                if call is not None:
                    choice["message"] = {"role": "assistant", "content": content or None, "tool_calls": [
                        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}]}
                    choice["finish_reason"] = "tool_calls"
        return {**self._envelope("chat.completion", choices), "usage": self.usage(sequences)}

    # ------------------------------------------------------------------ streamed responses

    async def _events(self, submitted: Submitted) -> AsyncIterator[tuple[Event, int, int]]:
        """(event, tokens reported before it, tokens now) until every choice is done."""
        reported = [0] * len(submitted.sequences)
        remaining = len(submitted.sequences)
        while remaining:
            event = await submitted.events.get()
            start, end = reported[event.index], event.tokens
            reported[event.index] = end
            if event.done is not None:
                remaining -= 1
                if event.done.finish_reason == "error":
                    raise ApiError(500, "generation failed on the server; see the server log")
            yield event, start, end

    async def stream_completion(self, submitted: Submitted, logprobs: bool, include_usage: bool
                                ) -> AsyncIterator[dict]:
        offsets = [0] * len(submitted.sequences)
        async for event, start, end in self._events(submitted):
            sequence = submitted.sequences[event.index]
            if event.text or (logprobs and end > start):
                choice = {"index": event.index, "text": event.text, "finish_reason": None,
                          "logprobs": self.completion_logprobs(sequence, start, end, offsets[event.index])
                          if logprobs else None}
                offsets[event.index] += len(event.text)
                yield self._envelope("text_completion", [choice])
            if event.done is not None:
                yield self._envelope("text_completion", [{"index": event.index, "text": "", "logprobs": None,
                                                          "finish_reason": sequence.finish_reason}])
        if include_usage:
            yield {**self._envelope("text_completion", []), "usage": self.usage(submitted.sequences)}

    async def stream_chat(self, submitted: Submitted, logprobs: bool, include_usage: bool) -> AsyncIterator[dict]:
        kind = "chat.completion.chunk"
        for index in range(len(submitted.sequences)):
            yield self._envelope(kind, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}])
        async for event, start, end in self._events(submitted):
            sequence = submitted.sequences[event.index]
            if event.text or (logprobs and end > start):
                yield self._envelope(kind, [{"index": event.index, "delta": {"content": event.text},
                                             "logprobs": self.chat_logprobs(sequence, start, end) if logprobs else None,
                                             "finish_reason": None}])
            if event.done is not None:
                yield self._envelope(kind, [{"index": event.index, "delta": {}, "logprobs": None,
                                             "finish_reason": sequence.finish_reason}])
        if include_usage:
            yield {**self._envelope(kind, []), "usage": self.usage(submitted.sequences)}
