"""Chat templates: a list of messages -> the one prompt string the model was trained to continue.

A template is Jinja2 with Hugging Face's conventions: it sees `messages` (dicts with `role` and
`content`), `add_generation_prompt` (end with the opening of the assistant's turn), `bos_token`
and `eos_token`. Our tokenizers carry ChatML; imported models (SmolLM2) carry their own template.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import UserError
from ..tokenizer.special_tokens import CHATML_TEMPLATE

ROLES = ("system", "user", "assistant", "tool")


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` with the tokenizer's chat template (ChatML if it has none)."""
    # CHATML_TEMPLATE: `<|im_start|>role\ncontent<|im_end|>\n` per message, then `<|im_start|>assistant\n`.
    messages = normalize_messages(messages)
    template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    bos_token, eos_token = special_token_strings(tokenizer)
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token)
    except TemplateRaised as error:
        raise UserError(f"the chat template rejected the messages ({error}); fix the conversation") from None


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Check the messages and return them as {"role", "content"} dicts with string content.

    Content may be a string or a list of OpenAI text parts ({"type": "text", "text": ...}); an
    assistant message may have null content (OpenAI clients send that after tool calls). OpenAI's
    newer "developer" role is the system role under another name.
    """
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts; add a message")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise UserError(f"messages[{index}] must be a dict with 'role' and 'content'; fix that message")
        role, content = message["role"], message.get("content")
        role = "system" if role == "developer" else role
        if content is None and role == "assistant":
            content = ""
        if role not in ROLES:
            raise UserError(f"messages[{index}] has role {role!r}; use one of {', '.join(ROLES)} (or developer)")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise UserError(f"messages[{index}].content parts must be {{'type': 'text', 'text': ...}}; "
                                "only text is supported")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise UserError(f"messages[{index}].content must be a string; fix that message")
        normalized.append({"role": role, "content": content})
    return normalized


def drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """The conversation without its oldest exchange: the first non-system message and the replies
    up to the next user message. System messages and the last message always stay; None when there
    is nothing left to drop."""
    droppable = [index for index, message in enumerate(messages[:-1]) if message["role"] != "system"]
    if not droppable:
        return None
    start = end = droppable[0]
    end += 1
    while end < len(messages) - 1 and messages[end]["role"] not in ("system", "user"):
        end += 1
    return messages[:start] + messages[end:]


def fit_chat(tokenizer: Any, context_length: int, messages: list[dict], max_new_tokens: int
             ) -> tuple[list[dict], str]:
    """Drop the oldest exchanges until the rendered prompt leaves room for `max_new_tokens`.

    Returns (the kept messages, their prompt). A single message that is still too long is returned
    as it is, for the engine's context policy to truncate or refuse.
    """
    messages = normalize_messages(messages)
    budget = context_length - max_new_tokens
    while True:
        prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
        if len(tokenizer.encode(prompt)) <= budget:
            return messages, prompt
        shorter = drop_oldest_exchange(messages)
        if shorter is None:
            return messages, prompt
        messages = shorter


def special_token_strings(tokenizer: Any) -> tuple[str, str]:
    """(bos_token, eos_token) strings for the template: the tokenizer's bos/eos roles, "" if none."""
    roles = getattr(tokenizer, "roles", None) or {}
    bos = getattr(tokenizer, "bos_token", None) or roles.get("bos") or ""
    eos = getattr(tokenizer, "eos_token", None) or roles.get("eos") or ""
    return bos, eos


class TemplateRaised(Exception):
    """`raise_exception(...)` called inside a chat template."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


@lru_cache(maxsize=16)
def _compile(template: str):
    """Compile in a sandbox, with the helpers HF templates use (raise_exception, tojson, strftime_now)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(template)
    except Exception as error:  # jinja2.TemplateSyntaxError and friends
        raise UserError(f"the tokenizer's chat template does not compile ({error}); fix or remove chat_template") from None
