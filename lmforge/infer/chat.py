"""Chat prompts for generation: the template machinery (lmforge.tokenizer.chat_template) plus
fitting a conversation into the context.

Rendering lives in the tokenizer layer, where supervised fine-tuning uses it too; the names are
re-exported here for the callers that import them from lmforge.infer.chat.
"""
from __future__ import annotations

from typing import Any

from ..tokenizer.chat_template import (ROLES, TemplateRaised, normalize_messages, render_chat, render_chat_ids,
                                       special_token_strings)

__all__ = ["ROLES", "TemplateRaised", "drop_oldest_exchange", "fit_chat", "normalize_messages", "render_chat",
           "render_chat_ids", "special_token_strings"]


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
             ) -> tuple[list[dict], list[int]]:
    """Drop the oldest exchanges until the prompt ids leave room for `max_new_tokens`.

    Returns (the kept messages, their prompt ids from `render_chat_ids(..., add_generation_prompt=True)`).
    A single message that is still too long is returned as it is, for the engine's context policy
    to truncate or refuse.
    """
    messages = normalize_messages(messages)
    budget = context_length - max_new_tokens
    while True:
        shorter = drop_oldest_exchange(messages)
        # Encoding the rendered string is much cheaper than render_chat_ids (which renders every
        # assistant turn's prefix) and does not count more tokens (the same for ordinary text;
        # special-token text is one token there, several as plain text): it decides the drops,
        # the ids decide the last one.
        if shorter is not None and len(tokenizer.encode(render_chat(tokenizer, messages))) > budget:
            messages = shorter
            continue
        ids, _ = render_chat_ids(tokenizer, messages, add_generation_prompt=True)
        if len(ids) <= budget or shorter is None:
            return messages, ids
        messages = shorter
