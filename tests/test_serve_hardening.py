"""Serving under hostile or careless clients: request size caps, fair sharing between requests, one
request's failure staying its own, and what the API key protects."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from infer_support import load_tiny
from lmforge.cli import main
from lmforge.infer import Engine
from lmforge.serve import DEFAULT_MAX_SEQUENCES_PER_REQUEST
from lmforge.serve.app import create_app
from lmforge.serve.auth import key_problem
from lmforge.serve.server import BackgroundServer

KEY = "test-key"
MODEL = "tiny"
CAP = 32
POISON_SEED = 4242

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def served(tiny):
    engine = Engine(*tiny, max_batch_size=4, context_policy="error")
    with BackgroundServer(create_app(engine, MODEL, api_key=KEY, max_sequences_per_request=CAP)) as server:
        yield server, engine


def post(server, path: str, body: dict, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)


def slowed(engine: Engine, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make each decode step take a while, so that requests surely overlap."""
    step = engine.step

    def slow_step() -> bool:
        time.sleep(seconds)
        return step()
    monkeypatch.setattr(engine, "step", slow_step)


def wait_idle(engine: Engine, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.running and not engine.waiting


def stream_lines(server, body: dict, started: threading.Event | None = None) -> list[str]:
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if started is not None:
                    started.set()
    return lines


def test_a_request_over_the_sequence_cap_is_a_400_naming_the_limit(served):
    server, _ = served
    response = post(server, "/v1/completions", {"model": MODEL, "prompt": ["ROMEO:"] * 9, "n": 4, "max_tokens": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "9 prompt(s) x n=4 = 36 sequences" in error["message"]
    assert f"limit of {CAP} per request" in error["message"] and "--max-sequences-per-request" in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "too_many_sequences"
    at_cap = post(server, "/v1/completions", {"model": MODEL, "prompt": ["ROMEO:"] * 8, "n": 4, "max_tokens": 1})
    assert at_cap.status_code == 200 and len(at_cap.json()["choices"]) == CAP
    assert httpx.get(server.url + "/health").json()["max_sequences_per_request"] == CAP


def test_serve_help_documents_the_cap_and_the_docs_decision(capsys):
    assert DEFAULT_MAX_SEQUENCES_PER_REQUEST == 256
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-sequences-per-request N" in help_text and "(default: 256)" in help_text
    assert "/docs and /redoc pages are then off" in help_text


def test_a_short_request_is_served_while_a_big_one_is_still_queued(served, monkeypatch):
    """32 prompts x 8 tokens on 4 rows take 64 steps; a 2-token request sent meanwhile gets the
    next free row (fair share between requests) instead of waiting for all 32."""
    server, engine = served
    slowed(engine, monkeypatch, 0.02)
    big_done = threading.Event()

    def big() -> None:
        response = post(server, "/v1/completions", {"model": MODEL, "prompt": ["ROMEO:"] * CAP, "max_tokens": 8,
                                                    "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200
        big_done.set()

    thread = threading.Thread(target=big)
    thread.start()
    deadline = time.monotonic() + 20
    while not engine.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.waiting, "the big request should fill the rows and the queue"
    short = post(server, "/v1/completions", {"model": MODEL, "prompt": "The king", "max_tokens": 2,
                                             "ignore_eos": True})
    assert short.status_code == 200 and short.json()["choices"][0]["finish_reason"] == "length"
    assert not big_done.is_set() and len(engine.waiting) > 8, "the short request should not wait for the big one"
    thread.join(timeout=60)
    assert big_done.is_set()


def test_a_request_whose_row_fails_gets_an_error_and_the_others_finish(served, monkeypatch):
    """An exception while sampling one request's row (injected) fails that request alone: no
    abort of everything in flight, as a value the sampler choked on once caused."""
    server, engine = served
    slowed(engine, monkeypatch, 0.01)
    sample = engine.sampler.sample

    def failing(logits, rows, row_list):
        for row in row_list:
            sequence = engine.slots[row]
            if sequence is not None and sequence.params.seed == POISON_SEED and len(sequence.token_ids) >= 2:
                raise RuntimeError("injected sampling failure")
        return sample(logits, rows, row_list)

    monkeypatch.setattr(engine.sampler, "sample", failing)
    started, result = threading.Event(), {}
    healthy = threading.Thread(target=lambda: result.setdefault("lines", stream_lines(
        server, {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 60, "temperature": 1.0, "seed": 1,
                 "ignore_eos": True}, started)))
    healthy.start()
    assert started.wait(20)
    poisoned = {"model": MODEL, "prompt": "O", "max_tokens": 20, "temperature": 1.0, "seed": POISON_SEED}
    response = post(server, "/v1/completions", poisoned)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "generation failed on the server" in response.json()["error"]["message"]
    streamed = stream_lines(server, poisoned)
    assert '"error"' in streamed[-2] and streamed[-1] == "data: [DONE]"
    healthy.join(timeout=60)
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]
    assert not any('"error"' in line for line in lines)
    assert engine.stats.failed >= 2
    wait_idle(engine)


def test_top_k_over_the_vocabulary_is_clamped_and_beyond_int32_refused(served):
    server, _ = served
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 8, "temperature": 1.0, "seed": 9}
    clamped = post(server, "/v1/completions", {**body, "top_k": 10**6})
    off = post(server, "/v1/completions", {**body, "top_k": 0})
    assert clamped.status_code == 200 and clamped.json()["choices"][0]["text"] == off.json()["choices"][0]["text"]
    refused = post(server, "/v1/completions", {**body, "top_k": 2**63})
    assert refused.status_code == 400
    assert "top_k must be an integer from 0 (off) to 2147483647" in refused.json()["error"]["message"]


def test_with_a_key_docs_are_off_and_the_schema_needs_the_key(served):
    server, _ = served
    for path in ("/docs", "/redoc", "/openapi.json", "/no-such-path"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/docs", headers=headers).status_code == 404
    assert httpx.get(server.url + "/redoc", headers=headers).status_code == 404
    schema = httpx.get(server.url + "/openapi.json", headers=headers)
    assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]
    assert httpx.get(server.url + "/health").status_code == 200          # liveness probes carry no key


def test_without_a_key_docs_are_open(tiny):
    client = TestClient(create_app(Engine(*tiny, max_batch_size=1), MODEL))   # no lifespan: no decode thread
    assert client.get("/docs").status_code == 200
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"bEaReR   {KEY}"])
def test_the_bearer_scheme_is_case_insensitive(served, header):
    assert httpx.get(served[0].url + "/v1/models", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize("header, message", [
    ("", "missing API key"), (KEY, "must use the Bearer scheme"), (f"Basic {KEY}", "must use the Bearer scheme"),
    ("Bearer", "incorrect API key"), ("Bearer wrong-key", "incorrect API key"),
    (f"Bearer {KEY}x", "incorrect API key"),
])
def test_a_wrong_authorization_header_is_a_401(served, header, message):
    headers = {"Authorization": header} if header else {}
    response = httpx.get(served[0].url + "/v1/models", headers=headers)
    assert response.status_code == 401 and message in response.json()["error"]["message"]
    assert key_problem(header.encode(), KEY.encode()) is not None
