"""--rag on chat, serve and web: passages go into the last user message, sources come back."""
from __future__ import annotations

import json

import httpx
import pytest

from infer_support import load_tiny
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.chat_command import ChatSession
from lmforge.rag import build_index
from lmforge.rag.generate import SOURCES_MARK, RagChat, rag_backend
from lmforge.serve.app import create_app
from lmforge.serve.server import BackgroundServer
from lmforge.serve.web_backends import ChatBackend, ChatSettings
from rag_helpers import tiny_chunks

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTION = "What is the capital of Germany?"


@pytest.fixture(scope="module")
def rag():
    return RagChat(build_index(tiny_chunks(), None, "bm25"), k=2)


@pytest.fixture(scope="module")
def engine():
    model, tokenizer = load_tiny()
    return Engine(model, tokenizer, max_batch_size=4, context_policy="truncate_left")


def test_chat_session_puts_passages_in_the_prompt_not_in_the_history(engine, rag, monkeypatch):
    prompts = []
    real_stream = engine.stream

    def recording_stream(prompt_ids, params):
        prompts.append(engine.tokenizer.decode(prompt_ids))
        return real_stream(prompt_ids, params)

    monkeypatch.setattr(engine, "stream", recording_stream)
    session = ChatSession(engine, SamplingParams(max_new_tokens=4, temperature=0.0), system="Be brief.")
    session.rag = rag
    "".join(session.reply(QUESTION))
    assert "[1] Berlin:" in prompts[0] and "Question: " + QUESTION in prompts[0]
    assert [p.title for p in session.sources][0] == "Berlin"
    assert session.turns[0] == {"role": "user", "content": QUESTION}     # the history keeps what the user typed
    "".join(session.reply("And what is a violin?"))
    assert "[1] Violin:" in prompts[1] and prompts[1].count("Passages:") == 1   # only the new message has passages


def test_serve_returns_the_sources(engine, rag):
    with BackgroundServer(create_app(engine, "tiny", rag=rag)) as server:
        body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert [s["title"] for s in reply["sources"]][0] == "Berlin" and reply["sources"][0]["index"] == 1
        assert reply["choices"][0]["message"]["role"] == "assistant"
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            header = json.loads(r.headers["x-rag-sources"])
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert header[0]["title"] == "Berlin" and chunks[-1] == "data: [DONE]"


class EchoBackend(ChatBackend):
    name, context_length = "echo", 512

    def __init__(self):
        self.seen = []

    def stream_reply(self, messages, settings):
        self.seen.append(messages)
        yield "Berlin [1]"

    def model_info(self):
        return "echo"


def test_web_backend_appends_sources_and_strips_them_from_the_history(rag):
    inner = EchoBackend()
    backend = rag_backend(inner, rag)
    reply = "".join(backend.stream_reply([{"role": "user", "content": QUESTION}], ChatSettings()))
    assert reply.startswith("Berlin [1]" + SOURCES_MARK) and "**Berlin**" in reply
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "violin?"}]
    "".join(backend.stream_reply(history, ChatSettings()))
    assert inner.seen[1][1]["content"] == "Berlin [1]"        # the footer is not sent back as model text
    assert "RAG:" in backend.model_info() and backend.name == "echo"
