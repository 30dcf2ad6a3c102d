"""Fuzzing the request boundary: while streams run, every out-of-range or mistyped sampling value
gets a 4xx with an OpenAI-style body, and the concurrent streams finish untouched.

Once, `top_k` >= 2**63 or a `repetition_penalty` beyond float32 passed validation and raised in
the shared decode thread, which then failed every request in flight. Localhost only, a few seconds.
"""
from __future__ import annotations

import itertools
import json
import threading
import time

import httpx
import pytest

from infer_support import load_tiny
from lmforge.infer import Engine
from lmforge.serve.app import create_app
from lmforge.serve.server import BackgroundServer

MODEL = "tiny"
INF, NAN = float("inf"), float("nan")
COMPLETION = {"model": MODEL, "prompt": "x", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}

# Every value here is wrong for its field: out of range, not finite, too big for any kernel, or of
# the wrong JSON type. httpx sends inf / nan as the JSON extensions Infinity / NaN, which Python's
# json parser (and so FastAPI) accepts: exactly the values a careless client can produce.
SHARED = {
    "temperature": [-1, 2.5, 1e39, -1e39, INF, -INF, NAN, 2**63, 10**400, "1", [1], {}, True],
    "top_p": [0, -0.5, 1.5, INF, NAN, 2**63, "0.5", True],
    "top_k": [2**63, 2**64, 10**30, 2**31, -1, -2**63, 1.5, INF, "5", [5], True],
    "min_p": [-0.1, 1.5, INF, NAN, 2**63, "0"],
    "repetition_penalty": [0, -1, 1e39, 1e-39, INF, NAN, 2**63, 10**400, "1"],
    "frequency_penalty": [2**63, 1e39, -1e39, INF, -INF, NAN, 3, "0"],
    "presence_penalty": [2**63, 1e39, -1e39, INF, -INF, NAN, -3, "0"],
    "seed": [2**64, -2**63 - 1, 10**30, 1.5, INF, "1", True],
    "max_tokens": [0, -1, 129, 2**63, 1e39, 1.5, "1", True],
    "n": [0, -1, 17, 2**63, 1.5, "2", True],
    "stop": [5, [1], [""], {"a": 1}, True],
    "stream": ["yes", 1],
    "ignore_eos": ["yes", 1],
    "model": [5, None, "gpt-4"],
}
ONLY = {
    "/v1/completions": {"logprobs": [-1, 21, 2**63, 1.5, "1"],
                        "prompt": [5, None, [], [-1], [10**30], [2**63], [1.5], {"a": 1}, ["ROMEO:"] * 300]},
    "/v1/chat/completions": {"top_logprobs": [-1, 21, 2**63, "1"], "logprobs": ["yes", 2],
                             "messages": ["hi", [], [{"role": "robot", "content": "x"}], None]},
}
# Number literals that json.dumps cannot write: beyond float (parsed as inf) and beyond Python's
# 4300-digit limit for ints (a parse error, which must still be a 400).
RAW = ["1e999", "-1e999", "1" + "0" * 5000]


def bad_requests() -> list[tuple[str, str]]:
    """(path, JSON body) pairs, spread over both endpoints."""
    paths = itertools.cycle(["/v1/completions", "/v1/chat/completions"])
    requests = []
    for field, values in SHARED.items():
        for value in values:
            path = next(paths)
            base = COMPLETION if path == "/v1/completions" else CHAT
            requests.append((path, json.dumps({**base, field: value})))
    for path, fields in ONLY.items():
        base = COMPLETION if path == "/v1/completions" else CHAT
        for field, values in fields.items():
            for value in values:
                extra = {"logprobs": True} if field == "top_logprobs" else {}
                requests.append((path, json.dumps({**base, **extra, field: value})))
    for field, literal in itertools.product(["temperature", "top_k", "repetition_penalty", "seed"], RAW):
        requests.append(("/v1/completions", json.dumps(COMPLETION)[:-1] + f', "{field}": {literal}}}'))
    return requests


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served():
    engine = Engine(*load_tiny(), max_batch_size=8, context_policy="error")
    with BackgroundServer(create_app(engine, MODEL, max_sequences_per_request=64)) as server:
        yield server, engine


def test_every_bad_value_is_a_4xx_and_concurrent_streams_finish_normally(served, monkeypatch):
    server, engine = served
    step = engine.step

    def slow_step() -> bool:   # leaves the CPU to the handlers; the streams keep going all along
        time.sleep(0.005)
        return step()
    monkeypatch.setattr(engine, "step", slow_step)

    fuzz_done = threading.Event()
    streams: list[list[str]] = []
    lock = threading.Lock()

    def keep_streaming(worker: int) -> None:
        """Open one stream after another until the fuzzing is over."""
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for seed in itertools.count(worker * 1000):
                body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 24, "temperature": 1.0, "seed": seed,
                        "ignore_eos": True, "stream": True}
                with client.stream("POST", "/v1/completions", json=body) as response:
                    lines = [line for line in response.iter_lines() if line.startswith("data: ")]
                with lock:
                    streams.append(lines)
                if fuzz_done.is_set():
                    return

    workers = [threading.Thread(target=keep_streaming, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 20
    while engine.running < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running >= 4, "the concurrent streams should be running before the fuzzing starts"

    steps_before, failures = engine.stats.steps, []
    started = time.monotonic()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for path, body in bad_requests():
                response = client.post(path, content=body, headers={"Content-Type": "application/json"})
                error = response.json().get("error") if response.headers.get("content-type", "").startswith(
                    "application/json") else None
                if not (400 <= response.status_code < 500 and isinstance(error, dict) and error.get("message")):
                    failures.append(f"{path} {body[:120]} -> {response.status_code} {response.text[:200]}")
        fuzz_seconds = time.monotonic() - started
        steps_during = engine.stats.steps - steps_before
    finally:
        fuzz_done.set()
        for worker in workers:
            worker.join(timeout=60)
    assert not failures, "\n".join(failures)
    assert fuzz_seconds < 30
    assert steps_during > 10, "the streams should have been decoding while the bad requests came in"
    assert len(streams) >= 4
    for lines in streams:
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert not any('"error"' in line for line in lines)
    assert engine.stats.failed == 0
