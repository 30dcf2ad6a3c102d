"""Where the web demo's replies come from: a model loaded in this process, or a running server.

Both backends speak the same small interface, so the Gradio app (`lmforge.serve.web`) does not
care which one it talks to:

    backend.stream_reply(messages, settings) -> Iterator[str]   # text increments, valid UTF-8
    backend.model_info() -> str                                  # Markdown for the info panel

`messages` are OpenAI-style chat messages: `[{"role": "system" | "user" | "assistant",
"content": str}, ...]`. Nothing here imports Gradio, so the backends are testable on their own.
"""
from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

from ..errors import ContextLengthError, UserError

Message = dict[str, str]


@dataclass
class ChatSettings:
    """The sampling controls the web page exposes."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256

    def validate(self) -> "ChatSettings":
        if self.temperature < 0:
            raise UserError(f"temperature {self.temperature} is negative; use 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p {self.top_p} is outside (0, 1]; use a value such as 0.95")
        if self.max_new_tokens < 1:
            raise UserError(f"max tokens {self.max_new_tokens} is below 1; ask for at least one token")
        return self


class ChatBackend(abc.ABC):
    """A source of streamed chat replies plus a description of the model behind it."""

    #: Short name for the page title, e.g. the model reference or the served model id.
    name: str = "model"
    #: How many chats the page lets run at the same time (the local engine batches them).
    max_concurrency: int = 1
    #: Prompt + reply tokens the model can attend to, when known (caps the max-tokens slider).
    context_length: int | None = None

    @abc.abstractmethod
    def stream_reply(self, messages: list[Message], settings: ChatSettings) -> Iterator[str]:
        """Yield the assistant's reply as text increments, as soon as they are generated."""

    @abc.abstractmethod
    def model_info(self) -> str:
        """Markdown for the model-info panel."""


def human_count(n: int) -> str:
    """134515008 -> '134.5M' (parameter counts read better this way)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------
# Local: a model loaded in this process, generating with the inference engine.
# --------------------------------------------------------------------------------------------


class LocalBackend(ChatBackend):
    """Streams from `lmforge.infer.Engine.stream_chat` on a model held in memory.

    The engine is thread-safe and batches concurrent streams, so the page may run as many chats
    at once as the engine has KV-cache rows.
    """

    def __init__(self, engine: Any, name: str) -> None:
        self.engine = engine
        self.name = name
        self.max_concurrency = engine.max_batch_size
        self.context_length = engine.context_length

    def stream_reply(self, messages: list[Message], settings: ChatSettings) -> Iterator[str]:
        from ..infer import SamplingParams
        from ..infer.chat import fit_chat

        settings.validate()
        params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p)
        # Like `lmforge chat`: a long conversation loses its oldest exchanges, not its system prompt.
        # The prompt is token ids, with message text encoded as plain text (no faked turns).
        _, prompt_ids = fit_chat(self.engine.tokenizer, self.engine.context_length, messages, params.max_new_tokens)
        yield from self.engine.stream(prompt_ids, params)

    def model_info(self) -> str:
        from ..model.info import count_parameters, describe

        model, tokenizer = self.engine.model, self.engine.tokenizer
        config = model.config
        counts = count_parameters(config)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        template = "its own" if getattr(tokenizer, "chat_template", None) else "none, ChatML is used"
        lines = [
            f"**Model:** `{self.name}` (loaded in this process)",
            "",
            f"- parameters: {human_count(counts.total)} ({counts.total:,}; "
            f"{human_count(counts.non_embedding)} non-embedding)",
            f"- context length: {self.engine.context_length} tokens",
            f"- device / dtype: {self.engine.device} / {dtype}",
            f"- tokenizer: {tokenizer.vocab_size:,} tokens, chat template: {template}",
            "",
            "```text",
            describe(config),
            "```",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Remote: a running `lmforge serve` (or any OpenAI-compatible server), streamed over SSE.
# --------------------------------------------------------------------------------------------


def normalize_base_url(url: str) -> str:
    """'http://host:8000' or 'http://host:8000/v1/' -> 'http://host:8000/v1'."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"server URL '{url}' is not an http(s) URL; use e.g. http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/")
    # The OpenAI routes live under /v1; a bare host:port means the default mount point.
    if not path:
        path = "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The `data` payload of each server-sent event (data lines joined, comments skipped)."""
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # an SSE comment, used as a keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _error_text(body: bytes) -> str:
    """The server's own explanation from an error body (OpenAI or FastAPI shape), if any."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").strip()[:300]
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if payload.get("detail"):
            return str(payload["detail"])
    return json.dumps(payload)[:300]


def _error_code(body: bytes) -> str | None:
    """The OpenAI error code in an error body, if any (e.g. context_length_exceeded)."""
    try:
        error = json.loads(body).get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def _context_length(models: list[dict[str, Any]], model: str) -> int | None:
    """The context length a server reports for `model`, under the names servers commonly use."""
    for entry in models:
        if entry.get("id") == model:
            for key in ("context_length", "max_model_len", "context_window"):
                if isinstance(entry.get(key), int):
                    return entry[key]
    return None


class RemoteBackend(ChatBackend):
    """Streams from an OpenAI-compatible `/v1/chat/completions` endpoint with httpx."""

    def __init__(self, server_url: str, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 300.0, max_concurrency: int = 16, transport: Any = None) -> None:
        import httpx

        self.base_url = normalize_base_url(server_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Generation can pause (long prompts, a busy batch), so only connecting is kept short.
        timeout = httpx.Timeout(timeout_s, connect=10.0)
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                   transport=transport)
        self.max_concurrency = max_concurrency
        self.models = self._list_models()
        if model is None:
            if not self.models:
                raise UserError(f"the server at {self.base_url} lists no models at /models; "
                                "pass the model id with --server-model")
            model = str(self.models[0]["id"])
        self.name = model
        self.context_length = _context_length(self.models, model)

    def _request_failed(self, error: Exception) -> UserError:
        return UserError(f"cannot reach the server at {self.base_url} ({error}); "
                         "start it with `lmforge serve` or fix --server-url")

    def _check_status(self, response: Any) -> None:
        if response.status_code < 400:
            return
        body = response.read()
        detail = _error_text(body)
        message = f"the server at {self.base_url} answered {response.status_code}: {detail}"
        if _error_code(body) == ContextLengthError.code:
            raise ContextLengthError(message)   # the server's own counts are in its message
        hint = "; pass the server's key with --api-key" if response.status_code in (401, 403) else ""
        raise UserError(message + hint)

    def _list_models(self) -> list[dict[str, Any]]:
        import httpx

        try:
            response = self.client.get("/models")
        except httpx.HTTPError as error:
            raise self._request_failed(error) from None
        self._check_status(response)
        return list(response.json().get("data", []))

    def stream_reply(self, messages: list[Message], settings: ChatSettings) -> Iterator[str]:
        """Stream the reply; a conversation the server finds too long loses its oldest exchanges."""
        from ..infer.chat import drop_oldest_exchange

        settings.validate()
        while True:
            try:
                yield from self._stream_once(messages, settings)
                return
            except ContextLengthError:   # raised before any text, so nothing is sent twice
                shorter = drop_oldest_exchange(messages)
                if shorter is None:
                    raise
                messages = shorter

    def _stream_once(self, messages: list[Message], settings: ChatSettings) -> Iterator[str]:
        import httpx

        body = {"model": self.name, "messages": messages, "stream": True,
                "temperature": settings.temperature, "top_p": settings.top_p,
                "max_tokens": settings.max_new_tokens}
        try:
            # Leaving this block (reply done, or the page pressed Stop and closed the generator)
            # closes the connection, which tells the server to stop generating.
            with self.client.stream("POST", "/chat/completions", json=body) as response:
                self._check_status(response)
                for data in iter_sse_data(response.iter_lines()):
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise UserError(f"the server at {self.base_url} failed mid-reply: "
                                        f"{_error_text(data.encode())}")
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as error:
            raise self._request_failed(error) from None

    def model_info(self) -> str:
        lines = [f"**Model:** `{self.name}` (served by {self.base_url})", "", "What `/v1/models` says:", ""]
        for entry in self.models:
            details = ", ".join(f"{key}: {value}" for key, value in entry.items() if key not in ("id", "object"))
            lines.append(f"- `{entry.get('id')}`" + (f" ({details})" if details else ""))
        if not self.models:
            lines.append("- (no models listed)")
        return "\n".join(lines)

    def close(self) -> None:
        self.client.close()


def api_key_from_env(explicit: str | None) -> str | None:
    """--api-key wins; otherwise $LMFORGE_API_KEY (keeps the key out of `ps` output)."""
    return explicit if explicit is not None else os.environ.get("LMFORGE_API_KEY") or None
