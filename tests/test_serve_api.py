"""The OpenAI-compatible server, through the real `openai` client against a live localhost server."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from infer_support import load_tiny
from lmforge.infer import Engine, SamplingParams, render_chat
from lmforge.serve.app import create_app
from lmforge.serve.server import BackgroundServer

KEY = "test-key"
MODEL = "tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def served(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch_size=16, context_policy="error")
    with BackgroundServer(create_app(engine, MODEL, api_key=KEY)) as server:
        yield server, engine


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny):
    """A separate engine on the same weights: what 'served alone' means."""
    model, tokenizer = tiny
    return Engine(model, tokenizer, max_batch_size=1)


def test_models_and_health(client, served):
    [model] = client.models.list().data
    assert model.id == MODEL
    health = httpx.get(served[0].url + "/health").json()      # no key needed
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completions_non_streaming_and_streaming(client, tiny, reference):
    _, tokenizer = tiny
    prompt = "To be or not to be"
    expected = reference.generate([prompt], SamplingParams(max_new_tokens=12))[0]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    [choice] = response.choices
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.id == chunks[0].id for c in chunks)


def test_completion_logprobs_and_token_prompts(client, tiny, reference):
    _, tokenizer = tiny
    ids = tokenizer.encode("The king")
    expected = reference.generate([ids], SamplingParams(max_new_tokens=5, logprobs=True))[0]
    response = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, logprobs=1)
    logprobs = response.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    assert "".join(logprobs.tokens) == expected.text
    # logprobs=N also gives the N most likely tokens at each position; greedy picks the first one.
    assert len(logprobs.top_logprobs) == len(logprobs.tokens)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top == {token: pytest.approx(logprob, abs=1e-5)}
    top3 = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, logprobs=3)
    assert all(len(top) == 3 for top in top3.choices[0].logprobs.top_logprobs)


def test_chat_non_streaming_and_streaming_with_usage(client, tiny, reference):
    _, tokenizer = tiny
    messages = [{"role": "system", "content": "Speak plainly."}, {"role": "user", "content": "Who goes there?"}]
    prompt = render_chat(tokenizer, messages)
    params = SamplingParams(max_new_tokens=15, temperature=0.8, seed=11)
    expected = reference.generate([prompt], params)[0]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0.8, seed=11)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0.8, seed=11,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens

    with_logprobs = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0.8,
                                                   seed=11, logprobs=True)
    content = with_logprobs.choices[0].logprobs.content
    assert bytes(b for item in content for b in item.bytes).decode("utf-8") == expected.text
    assert all(item.logprob <= 0 for item in content)

    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    for item in greedy.choices[0].logprobs.content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob


def test_sixteen_concurrent_streams_each_equal_the_request_served_alone(served):
    server, engine = served
    prompts = [f"{name}, what news from {place}?" * (1 + i % 3) for i, (name, place) in enumerate(
        [(n, p) for n in ("Romeo", "Juliet", "Hamlet", "Lear") for p in ("Verona", "Mantua", "Denmark", "Dover")])]
    settings = dict(model=MODEL, max_tokens=20, temperature=0, frequency_penalty=0.3,
                    extra_body={"repetition_penalty": 1.3})
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        stream = await aclient.chat.completions.create(messages=messages, stream=True, **settings)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def alone_then_together() -> tuple[list[str], list[str]]:
        alone = [await one(prompt) for prompt in prompts]
        together = await asyncio.gather(*(one(prompt) for prompt in prompts))
        return alone, list(together)

    engine.stats.peak_running = 0
    alone, together = asyncio.run(alone_then_together())
    assert together == alone
    assert len(set(alone)) > 4
    assert engine.stats.peak_running > 8, "concurrent requests should share decode steps"


def post(served, path: str, body: str | dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(served[0].url + path, content=content, headers=headers, timeout=30)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi"}


@pytest.mark.parametrize("path, body, message", [
    ("/v1/chat/completions", '{"model": "tiny", "messages": [', "not valid JSON"),
    ("/v1/completions", "[1, 2]", "valid dictionary"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, "model 'gpt-4' is not served"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens=0 is out of range"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -3}, "max_tokens=-3 is out of range"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 129}, "use 1 to 128"),
    ("/v1/completions", {**COMPLETION, "prompt": "x " * 300}, "context of 128 tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "5"}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
    ("/v1/completions", {**COMPLETION, "prompt": 5}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "non-empty list"),
    ("/v1/chat/completions", {"messages": CHAT["messages"]}, "'model' is required"),
    ("/v1/chat/completions", {**CHAT, "temperature": 3.5}, "temperature=3.5 is out of range"),
    ("/v1/completions", {**COMPLETION, "seed": 2**64}, "seed must be an integer between"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "has role 'robot'"),
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n=17 is out of range"),
])
def test_bad_requests_get_400_with_an_openai_error_body(served, path, body, message):
    response = post(served, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


def test_bad_requests_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="non-empty"):
        client.chat.completions.create(model=MODEL, messages=[])


def test_api_key_is_required_when_set(served):
    for key in (None, "wrong-key"):
        response = post(served, "/v1/chat/completions", CHAT, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served[0].url + "/v1/models").status_code == 401
    assert post(served, "/v1/chat/completions", {**CHAT, "max_tokens": 2}).status_code == 200


def slowed(engine: Engine, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.01) -> None:
    """Make each decode step take a while, so a request is surely still running when we act."""
    step = engine.step

    def slow_step() -> bool:
        time.sleep(seconds)
        return step()
    monkeypatch.setattr(engine, "step", slow_step)


def test_client_that_disconnects_mid_stream_frees_its_slot(served, monkeypatch):
    server, engine = served
    slowed(engine, monkeypatch)
    cancelled = engine.stats.cancelled
    body = {**COMPLETION, "max_tokens": 120, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
        assert engine.running == 1
    deadline = time.monotonic() + 10
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0 and not engine.waiting
    assert engine.stats.cancelled == cancelled + 1


def test_a_non_streaming_client_that_disconnects_frees_its_slot(served, monkeypatch):
    """Without a stream the handler still notices the closed connection while tokens keep coming."""
    server, engine = served
    slowed(engine, monkeypatch, seconds=0.05)
    cancelled = engine.stats.cancelled
    body = {**COMPLETION, "max_tokens": 120, "temperature": 1.0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 3    # 120 tokens would take 6 s more
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0 and not engine.waiting
    assert engine.stats.cancelled == cancelled + 1


def test_n_choices_per_prompt_with_seeds_and_usage(client, tiny, reference):
    """n=3 gives three choices; with a seed, choice j samples with seed + j (reproducible, different)."""
    _, tokenizer = tiny
    messages = [{"role": "user", "content": "Hail"}]
    prompt = render_chat(tokenizer, messages)
    expected = [reference.generate([prompt], SamplingParams(max_new_tokens=8, temperature=1.0, seed=20 + j))[0]
                for j in range(3)]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0,
                                              seed=20, n=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [e.text for e in expected]
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))        # counted once
    assert response.usage.completion_tokens == sum(e.completion_tokens for e in expected)

    # Two prompts x n=2, streamed: choice index = prompt index * n + j.
    chunks = list(client.completions.create(model=MODEL, prompt=["To be", "The king"], max_tokens=5,
                                            temperature=0, n=2, stream=True))
    texts = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    alone = [reference.generate([p], SamplingParams(max_new_tokens=5))[0].text for p in ("To be", "The king")]
    assert texts == {0: alone[0], 1: alone[0], 2: alone[1], 3: alone[1]}


def test_openai_message_variants_are_accepted(client, tiny, reference):
    """Newer clients send a "developer" role (= system) and null content on assistant turns."""
    _, tokenizer = tiny
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hail"},
                {"role": "assistant", "content": None}, {"role": "user", "content": "And?"}]
    prompt = render_chat(tokenizer, [{"role": "system", "content": "Be brief."}, messages[1],
                                     {"role": "assistant", "content": ""}, messages[3]])
    expected = reference.generate([prompt], SamplingParams(max_new_tokens=6))[0].text
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert response.choices[0].message.content == expected


def test_a_client_that_stops_reading_does_not_stall_the_others(served, client, monkeypatch):
    server, engine = served
    slowed(engine, monkeypatch, seconds=0.002)
    body = {**COMPLETION, "max_tokens": 100, "stream": True, "temperature": 1.0, "seed": 1}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as stalled:
        lines = stalled.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        # This client now reads nothing; others are served meanwhile.
        started = time.monotonic()
        response = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=10, temperature=0)
        assert response.choices[0].finish_reason in ("stop", "length")
        assert time.monotonic() - started < 20
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
