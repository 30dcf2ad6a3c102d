"""An OpenAI-compatible HTTP API over the generation engine (FastAPI).

    app = create_app(Engine(model, tokenizer), "my-model", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(`stream: true` sends OpenAI-format SSE chunks and ends with `data: [DONE]`). Every request is
handed to the continuous-batching `Scheduler`; handlers only wait on their own event queue.
The response bodies are built in responses.py, the API key is checked in auth.py.

Limits that keep one request from taking the server over: at most `max_sequences_per_request`
sequences (prompts x n) per request, and the engine shares its rows fairly between requests
(each request is one scheduling group), so a big request cannot starve a small one.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthError, UserError
from ..infer.chat import render_chat_ids
from ..infer.engine import Engine, Sequence
from ..infer.sampling import SamplingParams
from . import DEFAULT_MAX_SEQUENCES_PER_REQUEST
from .auth import ApiKeyMiddleware  # noqa: F401  (also importable from here, as before)
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, error_response
from .responses import Reply, Submitted, sse
from .scheduler import Scheduler

COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
DISCONNECT_CHECK_SECONDS = 0.5        # how soon an abandoned non-streaming request frees its row


def create_app(engine_or_scheduler: Engine | Scheduler, model_name: str, api_key: str | None = None,
               max_sequences_per_request: int = DEFAULT_MAX_SEQUENCES_PER_REQUEST, rag: Any = None) -> FastAPI:
    """The API app. Pass an Engine (a Scheduler is made for it) or a Scheduler to share one.
    With `rag` (a lmforge.rag RagChat), chat requests get retrieved passages in their last user
    message, and the response lists them under "sources" (a streamed one in the X-RAG-Sources header).

    With an `api_key`, every path but /health needs 'Authorization: Bearer KEY', /openapi.json
    included, and the /docs and /redoc pages are off (see auth.py for why).
    """
    if max_sequences_per_request < 1:
        raise UserError(f"max_sequences_per_request must be >= 1, not {max_sequences_per_request}")
    scheduler = (engine_or_scheduler if isinstance(engine_or_scheduler, Scheduler)
                 else Scheduler(engine_or_scheduler))
    engine = scheduler.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.close()

    # A browser opening /docs cannot send the key, so with a key the pages are off rather than broken.
    docs = {"docs_url": None, "redoc_url": None} if api_key is not None else {}
    app = FastAPI(title="lmforge", description="OpenAI-compatible API served by lmforge", lifespan=lifespan, **docs)
    app.state.scheduler = scheduler
    app.state.model_name = model_name
    _install_error_handlers(app)

    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    # The ids clients send: the model itself, and each LoRA adapter loaded beside it (multi_lora.py).
    adapter_names = list(engine.adapters.names) if engine.adapters is not None else []
    if model_name in adapter_names:
        raise UserError(f"adapter name '{model_name}' is also the model's name; give the adapter another name")
    served = [model_name, *adapter_names]

    def submit(prompts: list[str | list[int]], body: Any, default_max_tokens: int | None, logprobs: bool,
               top_logprobs: int) -> Submitted:
        adapter = None if body.model == model_name else body.model
        return _submit(scheduler, prompts, body, default_max_tokens, logprobs, top_logprobs,
                       max_sequences_per_request, adapter)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "adapters": adapter_names, "running": engine.running, "waiting": len(engine.waiting),
                "max_batch_size": engine.max_batch_size, "max_sequences_per_request": max_sequences_per_request,
                "stats": dataclasses.asdict(engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict:
        # An adapter names its base model in "parent", as vLLM lists LoRA modules.
        return {"object": "list", "data": [{"id": name, "object": "model", "created": _START_TIME, "owned_by": "lmforge",
                                            "context_length": engine.context_length,
                                            **({"parent": model_name} if name != model_name else {})}
                                           for name in served]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(body.model, served)
        logprobs = body.logprobs is not None
        submitted = submit(body.prompts(), body, COMPLETIONS_DEFAULT_MAX_TOKENS, logprobs, body.logprobs or 0)
        reply = Reply("cmpl", body.model, engine, body.choices())
        if body.stream:
            return sse(reply.stream_completion(submitted, logprobs, body.include_usage), submitted, scheduler)
        sequences = await _wait(request, submitted, scheduler)
        return reply.completion(sequences, logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _check_model(body.model, served)
        body.check()
        messages, tools = body.messages, None
        if body.tools and body.tool_choice != "none":   # tool calls: lmforge.infer.tools' markup
            from .tool_calls import ARROW, openai_tools_system_prompt, registry_from_openai, with_system_text

            tools = registry_from_openai(body.tools)
            messages = with_system_text(messages, openai_tools_system_prompt(tools))
            body.stop = ([body.stop] if isinstance(body.stop, str) else list(body.stop or [])) + [ARROW]
        sources = None
        if rag is not None:   # --rag: embedding the query is CPU work, kept off the event loop
            from ..rag.generate import sources_json

            messages, passages = await asyncio.to_thread(rag.augment, messages)
            sources = sources_json(passages)
        # Token ids, not text: message text is encoded as plain text, so it cannot fake a turn.
        prompt_ids, _ = render_chat_ids(engine.tokenizer, messages, add_generation_prompt=True)
        logprobs = bool(body.logprobs)
        submitted = submit([prompt_ids], body, None, logprobs, body.top_logprobs or 0)
        reply = Reply("chatcmpl", body.model, engine, body.choices())
        if body.stream:
            response = sse(reply.stream_chat(submitted, logprobs, body.include_usage), submitted, scheduler)
            if sources is not None:
                response.headers["X-RAG-Sources"] = json.dumps([{k: v for k, v in s.items() if k != "text"}
                                                                for s in sources])   # ASCII: json escapes
            return response
        sequences = await _wait(request, submitted, scheduler)
        result = reply.chat(sequences, logprobs, tools=tools)
        if sources is not None:
            result["sources"] = sources
        return result

    return app


_START_TIME = int(time.time())


def _check_model(requested: str, served: list[str]) -> None:
    if requested not in served:
        listed = " or ".join(f"'{name}'" for name in served)
        raise ApiError(400, f"the model '{requested}' is not served here; use model {listed} "
                            "(see GET /v1/models)", param="model", code="model_not_found")


def _submit(scheduler: Scheduler, prompts: list[str | list[int]], body: Any, default_max_tokens: int | None,
            logprobs: bool, top_logprobs: int, max_sequences: int, adapter: str | None = None) -> Submitted:
    """Validate n, the request's size and max_tokens, then queue `n` choices per prompt on one
    shared event queue, all in one scheduling group.

    Choice index = prompt index * n + j, as OpenAI orders them. With a seed, choice j samples with
    seed + j, so the choices differ but each is reproducible. `adapter`: the LoRA adapter to run
    (None: the base model).
    """
    engine = scheduler.engine
    limit = engine.context_length
    n = body.choices()
    if len(prompts) * n > max_sequences:   # before tokenizing anything: refusing must stay cheap
        raise ApiError(400, f"this request asks for {len(prompts)} prompt(s) x n={n} = {len(prompts) * n} "
                            f"sequences, over this server's limit of {max_sequences} per request "
                            "(lmforge serve --max-sequences-per-request); send fewer prompts or a smaller n, "
                            "or split the batch over several requests",
                       param="prompt" if len(prompts) > 1 else "n", code="too_many_sequences")
    if body.max_tokens is not None and not 1 <= body.max_tokens <= limit:
        raise ApiError(400, f"max_tokens={body.max_tokens} is out of range; use 1 to {limit} "
                            "(this model's context length)", param="max_tokens")
    events: asyncio.Queue = asyncio.Queue()
    sequences: list[Sequence] = []
    group = engine.new_group()
    try:
        for prompt in prompts:
            ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            max_tokens = body.max_tokens or default_max_tokens
            if max_tokens is None:
                # Chat default (OpenAI): whatever the context has left after the prompt.
                max_tokens = limit - len(ids) if len(ids) < limit else 1
            params: SamplingParams = body.sampling_params(max_tokens, logprobs, top_logprobs)
            for choice in range(n):
                if choice and params.seed is not None:
                    params = dataclasses.replace(params, seed=params.seed + 1).validate()
                sequences.append(scheduler.submit(ids, params, events, len(sequences), group=group,
                                                  adapter=adapter))
    except BaseException:
        for sequence in sequences:
            scheduler.cancel(sequence)
        raise
    return Submitted(events, sequences)


async def _wait(request: Request, submitted: Submitted, scheduler: Scheduler) -> list[Sequence]:
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
