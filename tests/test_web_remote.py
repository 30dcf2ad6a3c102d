"""The web demo's remote backend against scripted HTTP answers (httpx.MockTransport).

The end-to-end check against a real `lmforge serve` app is in tests/test_web_backends.py; these
tests pin the client's own behaviour: SSE parsing, the request it sends, and clear errors.
"""
from __future__ import annotations

import json

import httpx
import pytest

from lmforge.errors import UserError
from lmforge.serve.web_backends import (ChatSettings, RemoteBackend, api_key_from_env, iter_sse_data,
                                        normalize_base_url)

MODELS = {"object": "list", "data": [{"id": "tiny-chat", "object": "model", "owned_by": "lmforge",
                                       "context_length": 128}]}


def sse(*events: object) -> bytes:
    return b"".join(f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n".encode() for e in events)


def delta(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def scripted_server(chat_body: bytes, chat_status: int = 200, seen: list | None = None):
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(chat_status, content=chat_body,
                                  headers={"content-type": "text/event-stream" if chat_status == 200
                                           else "application/json"})
        return httpx.Response(404, json={"detail": "Not Found"})
    return httpx.MockTransport(handle)


def test_iter_sse_data_joins_lines_and_skips_comments():
    lines = [": keep-alive", "data: a", "", "data: b", "data: c", "", "event: x", "data:d", ""]
    assert list(iter_sse_data(lines)) == ["a", "b\nc", "d"]
    assert list(iter_sse_data(["data: last"])) == ["last"]   # no blank line at the end


@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
    ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
    ("https://example.org/proxy/v1", "https://example.org/proxy/v1"),
])
def test_normalize_base_url(url, expected):
    assert normalize_base_url(url) == expected


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://host/v1", "http://"])
def test_normalize_base_url_rejects_non_http(url):
    with pytest.raises(UserError, match="http"):
        normalize_base_url(url)


def test_streams_deltas_and_sends_openai_request():
    seen: list[httpx.Request] = []
    body = sse(delta("Hel"), delta("lo"), {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               "[DONE]")
    backend = RemoteBackend("http://server:8000", api_key="sk-test", transport=scripted_server(body, seen=seen))
    assert backend.name == "tiny-chat" and backend.context_length == 128
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    pieces = list(backend.stream_reply(messages, ChatSettings(temperature=0.5, top_p=0.9, max_new_tokens=7)))
    assert pieces == ["Hel", "lo"]
    request = seen[-1]
    assert request.headers["authorization"] == "Bearer sk-test"
    assert json.loads(request.content) == {"model": "tiny-chat", "messages": messages, "stream": True,
                                           "temperature": 0.5, "top_p": 0.9, "max_tokens": 7}


def test_model_info_lists_what_v1_models_says():
    backend = RemoteBackend("http://server:8000/v1", transport=scripted_server(sse("[DONE]")))
    info = backend.model_info()
    assert "`tiny-chat`" in info and "http://server:8000/v1" in info
    assert "owned_by: lmforge" in info and "context_length: 128" in info


def test_unauthorized_names_the_api_key_option():
    body = json.dumps({"error": {"message": "invalid API key", "type": "invalid_request_error"}}).encode()
    backend = RemoteBackend("http://server:8000", transport=scripted_server(body, chat_status=401))
    with pytest.raises(UserError, match=r"answered 401: invalid API key; pass the server's key with --api-key"):
        list(backend.stream_reply([{"role": "user", "content": "Hi"}], ChatSettings()))


def test_error_event_mid_stream_is_reported():
    body = sse(delta("par"), {"error": {"message": "engine failed", "type": "server_error"}})
    backend = RemoteBackend("http://server:8000", transport=scripted_server(body))
    stream = backend.stream_reply([{"role": "user", "content": "Hi"}], ChatSettings())
    assert next(stream) == "par"
    with pytest.raises(UserError, match="failed mid-reply: engine failed"):
        next(stream)


def test_unreachable_server_is_a_user_error():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)
    with pytest.raises(UserError, match=r"cannot reach the server at http://server:9/v1 .*lmforge serve"):
        RemoteBackend("http://server:9", transport=httpx.MockTransport(refuse))


def test_bad_settings_are_rejected_before_any_request():
    seen: list[httpx.Request] = []
    backend = RemoteBackend("http://server:8000", transport=scripted_server(sse("[DONE]"), seen=seen))
    with pytest.raises(UserError, match="top-p"):
        list(backend.stream_reply([{"role": "user", "content": "Hi"}], ChatSettings(top_p=0.0)))
    assert [request.url.path for request in seen] == ["/v1/models"]


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("LMFORGE_API_KEY", "from-env")
    assert api_key_from_env(None) == "from-env"
    assert api_key_from_env("explicit") == "explicit"
    monkeypatch.delenv("LMFORGE_API_KEY")
    assert api_key_from_env(None) is None
