"""User-facing errors.

Anything caused by bad user input (a file, a config, a request) raises `UserError` with one
sentence that names the input and the fix. The CLI prints it without a traceback and exits 2.
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is shown as-is, without a traceback."""

    exit_code = 2


class ContextLengthError(UserError):
    """A prompt (plus the tokens asked for) does not fit in the model's context."""

    code = "context_length_exceeded"   # OpenAI's error code for the same case

    def __init__(self, message: str, prompt_tokens: int | None = None, max_new_tokens: int | None = None,
                 context_length: int | None = None) -> None:
        super().__init__(message)
        self.prompt_tokens, self.max_new_tokens, self.context_length = prompt_tokens, max_new_tokens, context_length
