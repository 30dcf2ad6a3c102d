"""An OpenAI-compatible HTTP API over the generation engine (FastAPI).

    app = create_app(Engine(model, tokenizer), "my-model", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(`stream: true` sends OpenAI-format SSE chunks and ends with `data: [DONE]`). Every request is
handed to the continuous-batching `Scheduler`; handlers only wait on their own event queue.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthError, UserError
from ..infer.chat import render_chat_ids
from ..infer.engine import Engine, Sequence
from ..infer.sampling import SamplingParams
from .protocol import ChatCompletionRequest, CompletionRequest, error_response
from .scheduler import Event, Scheduler

COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
DISCONNECT_CHECK_SECONDS = 0.5        # how soon an abandoned non-streaming request frees its row


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def create_app(engine_or_scheduler: Engine | Scheduler, model_name: str, api_key: str | None = None) -> FastAPI:
    """The API app. Pass an Engine (a Scheduler is made for it) or a Scheduler to share one."""
    scheduler = (engine_or_scheduler if isinstance(engine_or_scheduler, Scheduler)
                 else Scheduler(engine_or_scheduler))
    engine = scheduler.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="lmforge", description="OpenAI-compatible API served by lmforge", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.model_name = model_name
    _install_error_handlers(app)

    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "running": engine.running, "waiting": len(engine.waiting),
                "max_batch_size": engine.max_batch_size, "stats": dataclasses.asdict(engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": _START_TIME,
                                            "owned_by": "lmforge", "context_length": engine.context_length}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(body.model, model_name)
        logprobs = body.logprobs is not None
        submitted = _submit(scheduler, body.prompts(), body, COMPLETIONS_DEFAULT_MAX_TOKENS, logprobs,
                            body.logprobs or 0)
        reply = _Reply("cmpl", model_name, engine, body.n or 1)
        if body.stream:
            return _sse(reply.stream_completion(submitted, logprobs, body.include_usage), submitted, scheduler)
        sequences = await _wait(request, submitted, scheduler)
        return reply.completion(sequences, logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _check_model(body.model, model_name)
        body.check()
        # Token ids, not text: message text is encoded as plain text, so it cannot fake a turn.
        prompt_ids, _ = render_chat_ids(engine.tokenizer, body.messages, add_generation_prompt=True)
        logprobs = bool(body.logprobs)
        submitted = _submit(scheduler, [prompt_ids], body, None, logprobs, body.top_logprobs or 0)
        reply = _Reply("chatcmpl", model_name, engine, body.n or 1)
        if body.stream:
            return _sse(reply.stream_chat(submitted, logprobs, body.include_usage), submitted, scheduler)
        sequences = await _wait(request, submitted, scheduler)
        return reply.chat(sequences, logprobs)

    return app


_START_TIME = int(time.time())


class ApiKeyMiddleware:
    """Answer 401 to /v1/ requests without 'Authorization: Bearer KEY', before the body is read.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware (`@app.middleware`) wraps `receive`,
    which hides a client's disconnect from `request.is_disconnected()`.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(header, self.expected):
                message = ("missing API key; send the header 'Authorization: Bearer KEY'" if not header
                           else "incorrect API key; send the key the server was started with")
                await error_response(401, message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclasses.dataclass
class _Submitted:
    events: asyncio.Queue
    sequences: list[Sequence]


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise ApiError(400, f"the model '{requested}' is not served here; use model '{served}' "
                            "(see GET /v1/models)", param="model", code="model_not_found")


def _submit(scheduler: Scheduler, prompts: list[str | list[int]], body: Any, default_max_tokens: int | None,
            logprobs: bool, top_logprobs: int) -> _Submitted:
    """Validate max_tokens, then queue `n` choices per prompt on one shared event queue.

    Choice index = prompt index * n + j, as OpenAI orders them. With a seed, choice j samples with
    seed + j, so the choices differ but each is reproducible.
    """
    engine = scheduler.engine
    limit = engine.context_length
    if body.max_tokens is not None and not 1 <= body.max_tokens <= limit:
        raise ApiError(400, f"max_tokens={body.max_tokens} is out of range; use 1 to {limit} "
                            "(this model's context length)", param="max_tokens")
    events: asyncio.Queue = asyncio.Queue()
    sequences: list[Sequence] = []
    try:
        for prompt in prompts:
            ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            max_tokens = body.max_tokens or default_max_tokens
            if max_tokens is None:
                # Chat default (OpenAI): whatever the context has left after the prompt.
                max_tokens = limit - len(ids) if len(ids) < limit else 1
            params: SamplingParams = body.sampling_params(max_tokens, logprobs, top_logprobs)
            for choice in range(body.n or 1):
                if choice and params.seed is not None:
                    params = dataclasses.replace(params, seed=params.seed + 1).validate()
                sequences.append(scheduler.submit(ids, params, events, len(sequences)))
    except BaseException:
        for sequence in sequences:
            scheduler.cancel(sequence)
        raise
    return _Submitted(events, sequences)


async def _wait(request: Request, submitted: _Submitted, scheduler: Scheduler) -> list[Sequence]:
    """Wait until every sequence is done; cancel them if the client goes away meanwhile."""
    remaining = len(submitted.sequences)
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_CHECK_SECONDS
    try:
        while remaining:
            try:
                event = await asyncio.wait_for(submitted.events.get(), timeout=DISCONNECT_CHECK_SECONDS)
            except asyncio.TimeoutError:
                event = None
            # Checked on a clock, not only when idle: a busy request gets an event every step.
            if loop.time() >= next_check:
                next_check = loop.time() + DISCONNECT_CHECK_SECONDS
                if await request.is_disconnected():
                    raise ApiError(499, "the client closed the connection")
            if event is None:
                continue
            if event.done is not None:
                remaining -= 1
                if event.done.finish_reason == "error":
                    raise ApiError(500, "generation failed on the server; see the server log")
    finally:
        for sequence in submitted.sequences:
            if not sequence.finished:
                scheduler.cancel(sequence)
    return submitted.sequences


def _sse(chunks: AsyncIterator[dict], submitted: _Submitted, scheduler: Scheduler) -> StreamingResponse:
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


class _Reply:
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

    def chat(self, sequences: list[Sequence], logprobs: bool) -> dict:
        choices = [{"index": index, "message": {"role": "assistant", "content": s.text.text},
                    "finish_reason": s.finish_reason,
                    "logprobs": self.chat_logprobs(s, 0, len(s.token_ids)) if logprobs else None}
                   for index, s in enumerate(sequences)]
        return {**self._envelope("chat.completion", choices), "usage": self.usage(sequences)}

    # ------------------------------------------------------------------ streamed responses

    async def _events(self, submitted: _Submitted) -> AsyncIterator[tuple[Event, int, int]]:
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

    async def stream_completion(self, submitted: _Submitted, logprobs: bool, include_usage: bool
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

    async def stream_chat(self, submitted: _Submitted, logprobs: bool, include_usage: bool) -> AsyncIterator[dict]:
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


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-style JSON body."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Any:
        return error_response(error.status, error.message, param=error.param, code=error.code,
                              error_type="server_error" if error.status >= 500 else "invalid_request_error")

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> Any:
        if isinstance(error, ContextLengthError):   # the engine's hint names settings an API client lacks
            return error_response(400, f"the prompt has {error.prompt_tokens} tokens and max_tokens asks for "
                                       f"{error.max_new_tokens} more, over this model's context of "
                                       f"{error.context_length} tokens; shorten the messages or lower max_tokens",
                                  code=error.code)
        return error_response(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Any:
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON; send a JSON object")
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(location) or "body"
        message = f"invalid request: {field}: {first.get('msg', 'invalid value')}"
        if first.get("type") == "missing":
            message = f"invalid request: '{field}' is required"
        return error_response(400, message, param=location[0] if location else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Any:
        return error_response(error.status_code, str(error.detail))
