"""OpenAI function calling on /v1/chat/completions, in lmforge's tool-call markup (lmforge.infer.tools).

The request's `tools` are described in the system prompt and the markup's arrow becomes a stop
string; a reply that stopped at a parseable call of a declared tool is answered as `tool_calls`
(`finish_reason: "tool_calls"`). The client runs the tool and sends a `role: tool` message back,
which the chat template renders inline, continuing the assistant's turn. The server runs nothing.
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import UserError
from ..infer.tools import _CALL_RE, ARROW, ToolRegistry, call_before_arrow
from ..tokenizer.chat_template import format_tool_call

def registry_from_openai(tools: list[dict]) -> ToolRegistry:
    """A registry of the request's tools (schemas only: in the OpenAI protocol the client runs them)."""
    registry = ToolRegistry()
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" \
            else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., "
                            "'parameters': {...}}}}; fix that tool")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        registry.register(function["name"], _client_side, str(function.get("description") or ""), parameters)
    return registry


def _client_side(**_: Any) -> str:
    raise RuntimeError("this tool runs on the client")


def split_tool_call(text: str, generated: str, registry: ToolRegistry) -> tuple[str, dict | None]:
    """(content before the call, {"name", "arguments"}) when a reply stopped at a call's arrow.

    `text` is the reply as streamed (the arrow cut off), `generated` the decoded tokens (the arrow
    in them). A reply that did not stop at an arrow, or whose call does not parse, is content only."""
    if ARROW not in generated:   # the arrow is a stop string: the streamed text never holds it
        return text, None
    raw = call_before_arrow(text)
    match = _CALL_RE.search(raw) if raw else None
    tool = registry.get(match.group(1)) if match else None
    if tool is None:
        return text, None
    try:
        arguments = tool.arguments(match.group(2))
    except ValueError:
        return text, None
    return text[:len(text) - len(raw)].rstrip(), {"name": tool.name,
                                                  "arguments": json.dumps(arguments, ensure_ascii=False)}


def openai_tools_system_prompt(registry: ToolRegistry) -> str:
    """The system-prompt text that tells the model about the request's tools (JSON arguments)."""
    lines = [f"You can call a tool by writing {format_tool_call('tool', '{json arguments}')} and stopping; "
             "its result will follow the arrow. Tools:"]
    for tool in registry.tools.values():
        lines.append(f"- {tool.name}: {tool.description} Parameters: "
                     f"{json.dumps(tool.parameters, ensure_ascii=False)}")
    return "\n".join(lines)


def with_system_text(messages: list[dict], text: str) -> list[dict]:
    """The messages with `text` added to the system message (a new one first when there is none)."""
    messages = list(messages)
    first = messages[0] if messages else {}
    if isinstance(first, dict) and first.get("role") in ("system", "developer") and isinstance(first.get("content"), str):
        messages[0] = {**first, "content": f"{first['content']}\n\n{text}"}
    else:
        messages.insert(0, {"role": "system", "content": text})
    return messages
