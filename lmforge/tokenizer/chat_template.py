"""Chat templates: messages -> the prompt text, or -> token ids plus a loss mask for fine-tuning.

A template is Jinja2 with Hugging Face's conventions: it sees `messages` (dicts with `role` and
`content`), `add_generation_prompt` (end with the opening of the assistant's turn), `bos_token`
and `eos_token`. Our tokenizers carry ChatML; imported models (SmolLM2) carry their own template.

    text = render_chat(tok, messages)                      # one string, as HF renders it
    ids, mask = render_chat_ids(tok, messages)             # mask[t] = 1: train on ids[t]
    prompt_ids, _ = render_chat_ids(tok, messages, add_generation_prompt=True)   # for generation

`render_chat_ids` keeps the template's markup apart from the message text: markup is encoded with
special tokens, message text always as ordinary text, so a message holding "<|im_end|>" cannot
fake a turn (role faking). Assistant turns are found by rendering prefixes of the conversation:
render(messages[:i], add_generation_prompt=True) must be a prefix of render(messages[:i+1]), and
the difference is what the model generates for turn i (its text, then the end-of-turn markup).
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

from ..errors import UserError
from .special_tokens import CHATML_TEMPLATE, END_TOKENS

ROLES = ("system", "user", "assistant", "tool")
# Tool calls are written inline in the assistant's text, in Toolformer's markup
# "[name(arguments)→ result]": an assistant message's OpenAI `tool_calls` and the `tool` messages
# answering them render as one assistant turn (lmforge.infer.tools decodes the same markup).
TOOL_CALL_OPEN, TOOL_CALL_ARROW, TOOL_CALL_CLOSE = "[", "→", "]"


def format_tool_call(name: str, arguments: str) -> str:
    """'[name(arguments)→': a call up to the point where the model stops and the tool runs."""
    return f"{TOOL_CALL_OPEN}{name}({arguments}){TOOL_CALL_ARROW}"


def format_tool_result(result: str) -> str:
    """' result]': what follows the arrow once the tool has run."""
    return f" {result}{TOOL_CALL_CLOSE}"
TRAIN_ON = ("assistant", "last_assistant", "all")
TrainOn = Literal["assistant", "last_assistant", "all"]

# Stands in for message i's text to find where the template puts it (private-use code points,
# which no template writes or transforms).
_SENTINEL = "\U000f0000{}\U000f0001"
_SENTINEL_RE = re.compile("\U000f0000([0-9]+)\U000f0001")


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` with the tokenizer's chat template (ChatML if it has none)."""
    # CHATML_TEMPLATE: `<|im_start|>role\ncontent<|im_end|>\n` per message, then `<|im_start|>assistant\n`.
    messages = normalize_messages(messages)
    if add_generation_prompt and messages[-1].get("continues"):   # an open turn after a tool result
        return _Renderer(tokenizer)(messages[:-1], True) + messages[-1]["content"]
    return _Renderer(tokenizer)(messages, add_generation_prompt)


def render_chat_ids(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False,
                    train_on: TrainOn = "assistant") -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation, both of length T; mask[t] = 1 marks a token to train on.

    Message text is always encoded as plain text: special-token strings in it stay ordinary tokens.
    Otherwise ids equal `tokenizer.encode(render_chat(...))`, except where a pre-token would
    straddle the start or end of an assistant turn (e.g. a reply starting with two spaces): the ids
    break there, as the prompt does at generation time.
    train_on: "assistant" masks every assistant turn from its first token through its end-of-turn
    token (`default_stop_token_ids`; what follows it in the turn, e.g. "\\n", is not trained on),
    "last_assistant" only the final assistant turn, "all" every token.
    UserError: the template does not render prefixes as prefixes (see the module docstring), an
    assistant turn has no end-of-turn token (a model that would never learn to stop), or the mask
    is empty. With add_generation_prompt=True the result is a generation prompt (it ends with the
    opening of the assistant's turn) and the last two are not checked.
    """
    if train_on not in TRAIN_ON:
        raise UserError(f"train_on={train_on!r} is not one of {', '.join(TRAIN_ON)}; pick one of them")
    messages = normalize_messages(messages)
    if add_generation_prompt and messages[-1].get("continues"):
        # The assistant's turn is open after a tool result: the model continues it, not a new turn.
        ids, mask = render_chat_ids(tokenizer, messages[:-1], add_generation_prompt=True, train_on=train_on)
        tail = tokenizer.encode(messages[-1]["content"], allow_special=False)
        return ids + tail, mask + [0] * len(tail)
    render = _Renderer(tokenizer)
    text, turns = _split_turns(render, messages, add_generation_prompt)
    plain = _plain_text_ranges(render, tokenizer, messages, text, add_generation_prompt)

    # Encode the text in runs, cut where a turn starts or ends (the mask needs token boundaries
    # there, and the prompt at generation time ends there too) and around message text that
    # must be plain; elsewhere runs are long, so ids match the one-string encoding.
    cuts = sorted({0, len(text), *(edge for turn in turns for edge in turn[1:]),
                   *(edge for span in plain for edge in span)})
    ids: list[int] = []
    token_at: dict[int, int] = {}   # char position of a cut -> index of the first token after it
    for start, end in zip(cuts, cuts[1:]):
        token_at[start] = len(ids)
        is_plain = any(a <= start and end <= b for a, b in plain)
        ids += tokenizer.encode(text[start:end], allow_special=not is_plain)
    token_at[len(text)] = len(ids)

    mask = [int(train_on == "all")] * len(ids)
    stops = default_stop_token_ids(tokenizer)
    for index, start, end in turns[-1:] if train_on == "last_assistant" else turns:
        first, last = token_at[start], token_at[end]
        stop = next((t for t in range(first, last) if ids[t] in stops), None)
        if stop is None and not add_generation_prompt:
            raise UserError(f"the assistant turn messages[{index}] ends without an end-of-turn token "
                            f"({_stop_names(tokenizer, stops)}) in the chat template, so the model would never "
                            "learn to stop; use a template that closes assistant turns with one")
        end = last if stop is None else stop + 1
        mask[first:end] = [1] * (end - first)
    if not any(mask) and not add_generation_prompt:
        raise UserError("the conversation has no assistant turn to train on; add an assistant reply "
                        "or use train_on='all'")
    return ids, mask


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Check the messages and return them as {"role", "content"} dicts with string content.

    Content may be a string or a list of OpenAI text parts ({"type": "text", "text": ...}); an
    assistant message may have null content (OpenAI clients send that after tool calls). OpenAI's
    newer "developer" role is the system role under another name. An assistant message's
    `tool_calls`, the `tool` messages answering them and the assistant's next reply become one
    assistant message in the inline markup ("[name(args)→ result]"); it has "continues": True when
    the conversation ends with a tool result (the model goes on with that turn).
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
        previous = normalized[-1] if normalized else {}
        if previous.get("pending") is not None and role in ("tool", "assistant"):
            # A tool result (or the reply after it) goes on with the assistant turn that made the calls.
            pending = previous["pending"]
            if role == "tool":
                previous["content"] += (pending.pop(0) if pending else "") + format_tool_result(content)
                previous["continues"] = True
                continue
            previous["content"] += "".join(pending) + content
            previous.update(pending=None, continues=False)
            if message.get("tool_calls"):
                previous["pending"] = _tool_call_texts(index, message["tool_calls"])
            continue
        entry = {"role": role, "content": content}
        if role == "assistant" and message.get("tool_calls"):
            entry["pending"] = _tool_call_texts(index, message["tool_calls"])
        normalized.append(entry)
    for entry in normalized:   # calls left without a result are shown as made
        entry["content"] += "".join(entry.pop("pending", None) or [])
        if not entry.pop("continues", False) or entry is not normalized[-1]:
            continue
        entry["continues"] = True
    return normalized


def _tool_call_texts(index: int, calls: Any) -> list[str]:
    """The markup of an assistant message's OpenAI tool_calls: '[name({"arg": ...})→' each."""
    if not isinstance(calls, list):
        raise UserError(f"messages[{index}].tool_calls must be a list of calls; fix that message")
    texts = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f"messages[{index}].tool_calls entries must be {{'type': 'function', 'function': "
                            "{'name': ..., 'arguments': ...}}; fix that message")
        arguments = function.get("arguments") or "{}"
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        texts.append(format_tool_call(function["name"], arguments))
    return texts


def special_token_strings(tokenizer: Any) -> tuple[str, str]:
    """(bos_token, eos_token) strings for the template: the tokenizer's bos/eos roles, "" if none."""
    roles = getattr(tokenizer, "roles", None) or {}
    bos = getattr(tokenizer, "bos_token", None) or roles.get("bos") or ""
    eos = getattr(tokenizer, "eos_token", None) or roles.get("eos") or ""
    return bos, eos


def default_stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's end-of-text and end-of-turn tokens: generation stops at any of them, and an
    assistant turn is trained on through the first of them."""
    ids = set()
    for name in ("eot_id", "eos_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    specials = getattr(tokenizer, "special_tokens", None) or {}
    ids.update(specials[name] for name in END_TOKENS if name in specials)
    return frozenset(ids)


class TemplateRaised(Exception):
    """`raise_exception(...)` called inside a chat template."""


# --- internals -------------------------------------------------------------------------------


class _Renderer:
    """The tokenizer's template, compiled once, rendering already-normalized messages."""

    def __init__(self, tokenizer: Any) -> None:
        self.template = _compile(getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE)
        self.bos_token, self.eos_token = special_token_strings(tokenizer)

    def __call__(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateRaised as error:
            raise UserError(f"the chat template rejected the messages ({error}); fix the conversation") from None


def _split_turns(render: _Renderer, messages: list[dict[str, str]], add_generation_prompt: bool
                 ) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and its assistant turns as (message index, start, end) in chars.

    Around each assistant turn, the renderings of the conversation before it (with the generation
    prompt) and through it must be prefixes of the whole text, in order: the turn starts where
    the generation prompt before it ends, and ends where the next message begins.
    """
    text = render(messages, add_generation_prompt)
    turns, done = [], 0

    def boundary(prefix: str, what: str) -> int:
        if not text.startswith(prefix) or len(prefix) < done:
            raise UserError(f"the chat template is not incremental: rendering {what} is not a prefix of rendering "
                            "the whole conversation, so its assistant turns cannot be located; use a template "
                            "that renders each message after the ones before it")
        return len(prefix)

    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = done = boundary(render(messages[:index], True),
                                f"the first {index} messages with the generation prompt")
        last = index + 1 == len(messages) and not add_generation_prompt
        done = len(text) if last else boundary(render(messages[:index + 1], False), f"the first {index + 1} messages")
        turns.append((index, start, done))
    return text, turns


def _plain_text_ranges(render: _Renderer, tokenizer: Any, messages: list[dict[str, str]], text: str,
                       add_generation_prompt: bool) -> list[tuple[int, int]]:
    """Char ranges of message text in `text` that must be encoded as ordinary text.

    That is message text holding a special-token string (or forming one with the markup around
    it); other message text encodes the same either way. The text is located by rendering the
    conversation with a sentinel in place of each message's content; a template may show the
    content as it is or stripped of surrounding whitespace.
    """
    specials = sorted(getattr(tokenizer, "special_tokens", None) or {}, key=lambda token: (-len(token), token))
    if not specials:
        return []
    risky = [index for index, message in enumerate(messages) if any(s in message["content"] for s in specials)]
    spans = _locate_contents(render, messages, text, add_generation_prompt)
    if spans is None:
        if risky:
            raise UserError(f"messages[{risky[0]}] holds special-token text and the chat template changes that "
                            "message's text, so it cannot be kept apart from the template's markup; remove the "
                            "special-token text from the message")
        return []
    # Leftmost, longest-first matching, as the tokenizer splits special tokens off.
    matches = [m.span() for m in re.finditer("|".join(map(re.escape, specials)), text)]
    return [(start, end) for start, end in spans
            if start < end and any(a < end and start < b for a, b in matches)]


def _locate_contents(render: _Renderer, messages: list[dict[str, str]], text: str,
                     add_generation_prompt: bool) -> list[tuple[int, int]] | None:
    """(start, end) in `text` of each non-empty message content; None when the template shows some
    content other than as it is or stripped, leaves it out, or shows it twice."""
    stand_ins = [{**m, "content": _SENTINEL.format(i)} if m["content"] else m for i, m in enumerate(messages)]
    parts = _SENTINEL_RE.split(render(stand_ins, add_generation_prompt))
    markup, order = parts[0::2], [int(index) for index in parts[1::2]]
    if sorted(order) != [i for i, m in enumerate(messages) if m["content"]]:
        return None
    spans, cursor = [], 0
    for position, index in enumerate(order):
        if not text.startswith(markup[position], cursor):
            return None
        cursor += len(markup[position])
        content, following = messages[index]["content"], markup[position + 1]
        for shown in dict.fromkeys((content, content.strip())):
            if text.startswith(shown, cursor) and text.startswith(following, cursor + len(shown)):
                spans.append((cursor, cursor + len(shown)))
                cursor += len(shown)
                break
        else:
            return None
    return spans if cursor + len(markup[-1]) == len(text) and text.endswith(markup[-1]) else None


def _stop_names(tokenizer: Any, stops: frozenset[int]) -> str:
    names = [token for token, index in (getattr(tokenizer, "special_tokens", None) or {}).items() if index in stops]
    return ", ".join(sorted(names)) or "none known"


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
        raise UserError(f"the tokenizer's chat template does not compile ({error}); "
                        "fix or remove chat_template") from None
