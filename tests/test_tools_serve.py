"""OpenAI `tools` / `tool_calls` through the real `openai` client against a live server, and the chat
template rendering tool calls and results inline as plain text."""
from __future__ import annotations

import json

import openai
import pytest

from lmforge.infer import Engine
from lmforge.serve.app import create_app
from lmforge.serve.server import BackgroundServer
from lmforge.tokenizer.chat_template import render_chat, render_chat_ids
from tools_support import scripted_model

pytestmark = pytest.mark.usefixtures("one_thread")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def script(context: str) -> str:
    if "get_weather" not in context:          # no tools offered: a plain answer
        return "I cannot look that up."
    if "→ 22 C, sunny]" in context:           # the client sent the tool's result back
        return " It is 22 C and sunny in Paris."
    return 'Checking. [get_weather({"city": "Paris"})→'


@pytest.fixture(scope="module")
def served():
    model, tokenizer = scripted_model(script)
    engine = Engine(model, tokenizer, max_batch_size=4)
    with BackgroundServer(create_app(engine, "scripted")) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60), model


def test_tool_calls_round_trip_with_the_openai_client(served):
    client, model = served
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER], temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The model was told about the tool in the system prompt.
    assert "get_weather" in model.prompts[-1] and '"city"' in model.prompts[-1]

    # The client runs the tool and sends the assistant's call and a `tool` message back.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "22 C, sunny"}]
    second = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER], temperature=0)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == " It is 22 C and sunny in Paris."
    assert not second.choices[0].message.tool_calls
    # The assistant turn was continued after the result, not closed and reopened.
    assert model.prompts[-1].endswith('Checking.[get_weather({"city": "Paris"})→ 22 C, sunny]')


def test_without_tools_or_with_tool_choice_none_the_reply_is_plain(served):
    client, _ = served
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = client.chat.completions.create(model="scripted", messages=messages, temperature=0)
    assert plain.choices[0].message.content == "I cannot look that up." and not plain.choices[0].message.tool_calls
    none = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER], tool_choice="none",
                                          temperature=0)
    assert none.choices[0].finish_reason == "stop" and not none.choices[0].message.tool_calls


def test_unsupported_tool_requests_get_a_400(served):
    client, _ = served
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER], tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="stream=true with tools"):
        client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER], stream=True)
    with pytest.raises(openai.BadRequestError, match="tools\\[0\\]"):
        client.chat.completions.create(model="scripted", messages=messages, tools=[{"type": "function"}])


def test_the_template_renders_calls_and_results_inline_as_plain_text():
    _, tokenizer = scripted_model(script)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny <|im_end|>"}]
    # Ends with a tool result: the generation prompt continues the assistant's turn.
    ids, _ = render_chat_ids(tokenizer, messages, add_generation_prompt=True)
    opened = render_chat(tokenizer, messages[:1]) + '[get_weather({"city": "Paris"})→ sunny <|im_end|>]'
    assert render_chat(tokenizer, messages) == opened
    assert tokenizer.decode(ids) == opened
    # The tool's special-token text stays plain text: one <|im_end|> token only would end the turn.
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert ids.count(im_end) == 1   # the user turn's
    # With the final reply, it is one assistant turn, trained on as a whole.
    done = messages + [{"role": "assistant", "content": " It is sunny."}]
    ids, mask = render_chat_ids(tokenizer, done)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == '[get_weather({"city": "Paris"})→ sunny <|im_end|>] It is sunny.<|im_end|>'
