"""The OpenAI request bodies the server accepts, and its error responses.

Types are strict (a string where a number belongs is a 400, as with OpenAI); unknown fields are
ignored so that newer clients keep working. `top_k`, `min_p`, `repetition_penalty` and
`ignore_eos` are extensions that vLLM also accepts. Values are checked here, at the request
boundary: OpenAI's ranges for its own fields, then `SamplingParams.validate` for every field
(finite, in range), so nothing reaches the shared decode thread that could fail it.
"""
from __future__ import annotations

from typing import Any, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ..errors import UserError
from ..infer.sampling import SamplingParams

MAX_CHOICES = 16   # n: choices per prompt, each decoded in its own KV-cache row
Prompt = Union[str, list[str], list[int], list[list[int]]]


class ApiError(Exception):
    """An error with an HTTP status, answered as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields that completions and chat completions share."""

    model_config = ConfigDict(strict=True)
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None

    def choices(self) -> int:
        """n, checked: choices per prompt."""
        if self.n is not None and not 1 <= self.n <= MAX_CHOICES:
            raise UserError(f"n={self.n} is out of range; ask for 1 to {MAX_CHOICES} choices")
        return self.n or 1

    def sampling_params(self, max_tokens: int, logprobs: bool, top_logprobs: int = 0) -> SamplingParams:
        for name, low, high in (("temperature", 0.0, 2.0), ("presence_penalty", -2.0, 2.0),
                                ("frequency_penalty", -2.0, 2.0)):
            value = getattr(self, name)
            # Written so that NaN fails too (every comparison with NaN is false).
            if value is not None and not low <= value <= high:
                raise UserError(f"{name}={value} is out of range; use a value between {low} and {high}")
        self.choices()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=_default(self.temperature, 1.0), top_k=_default(self.top_k, 0),
            top_p=_default(self.top_p, 1.0), min_p=_default(self.min_p, 0.0),
            repetition_penalty=_default(self.repetition_penalty, 1.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0),
            presence_penalty=_default(self.presence_penalty, 0.0), stop=stop, seed=self.seed, logprobs=logprobs,
            top_logprobs=top_logprobs, ignore_eos=bool(self.ignore_eos),
        ).validate()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: int | None = None      # OpenAI: the chosen tokens' log-probs plus this many top alternatives
    echo: bool | None = None

    def prompts(self) -> list[str | list[int]]:
        """One prompt or a batch: a string, a list of strings, token ids, or a list of token-id lists."""
        if self.echo:
            raise UserError("echo=true is not supported; leave echo out")
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            return [prompt]
        if not prompt:
            raise UserError("prompt is an empty list; send a string or a non-empty list of prompts")
        return list(prompt)


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None        # OpenAI function tools; the client runs them
    tool_choice: str | dict[str, Any] | None = None  # "auto" | "none" ("required" / a named tool: refused)

    def check(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise UserError("top_logprobs needs logprobs=true; send both")
        if self.tools and self.tool_choice not in (None, "auto", "none"):
            raise UserError(f"tool_choice={self.tool_choice!r} is not supported; use 'auto' or 'none'")
        if self.tools and self.tool_choice != "none" and self.stream:
            raise UserError("stream=true with tools is not supported; send stream=false when you pass tools")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   error_type: str = "invalid_request_error") -> JSONResponse:
    """An OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": error_type, "param": param, "code": code}})


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value
