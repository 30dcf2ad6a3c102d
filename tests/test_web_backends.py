"""The web demo's backends on a real (tiny, trained) model: in process, and through `lmforge serve`.

Also the pieces of the Gradio app that need no browser: message conversion, the info panel, the
controls' limits, and `lmforge web`'s command line. The browser test is tests/test_web_browser.py.
"""
from __future__ import annotations

import socket

import pytest

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.chat import fit_chat
from lmforge.model.info import count_parameters
from lmforge.serve.app import create_app
from lmforge.serve.server import BackgroundServer
from lmforge.serve.web import build_messages, build_web_app, launch, message_text
from lmforge.serve.web_backends import ChatSettings, LocalBackend, RemoteBackend, human_count
from threads import one_thread
from web_support import MODEL_NAME, PROMPT, REPLY, tiny_chat_engine, train_tiny_chat_model

GREEDY = ChatSettings(temperature=0.0, top_p=1.0, max_new_tokens=64)
HELLO = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def tiny_chat():
    with one_thread():
        yield train_tiny_chat_model()


@pytest.fixture(scope="module")
def local(tiny_chat):
    return LocalBackend(tiny_chat_engine(*tiny_chat), MODEL_NAME)


@pytest.fixture(scope="module")
def served(tiny_chat):
    """A live `lmforge serve` app (uvicorn in a thread) with an API key."""
    app = create_app(tiny_chat_engine(*tiny_chat), MODEL_NAME, api_key="secret")
    with BackgroundServer(app) as server:
        yield server


def test_local_backend_streams_the_reply(local):
    pieces = list(local.stream_reply(HELLO, GREEDY))
    assert "".join(pieces) == REPLY
    assert len(pieces) > 5, "the reply should arrive in many increments, not at once"


def test_local_backend_obeys_max_tokens(local):
    text = "".join(local.stream_reply(HELLO, ChatSettings(temperature=0.0, max_new_tokens=4)))
    assert text and REPLY.startswith(text) and len(text) < len(REPLY) // 2


def test_local_model_info(local, tiny_chat):
    model, tokenizer = tiny_chat
    total = count_parameters(model.config).total
    assert total == sum(p.numel() for p in model.parameters())
    info = local.model_info()
    for expected in (f"`{MODEL_NAME}`", f"{human_count(total)} ({total:,};", "context length: 128 tokens",
                     "device / dtype: cpu / float32", f"tokenizer: {tokenizer.vocab_size:,} tokens",
                     "decoder-only causal LM (GPT)", "grouped-query attention, 4 query heads x 16, 2 kv heads",
                     "RoPE"):
        assert expected in info, f"{expected!r} missing from the info panel:\n{info}"


def test_remote_backend_streams_from_lmforge_serve(served):
    remote = RemoteBackend(served.url, api_key="secret")          # a bare host:port means .../v1
    assert remote.base_url == served.url + "/v1"
    assert remote.name == MODEL_NAME and remote.context_length == 128
    pieces = list(remote.stream_reply(HELLO, GREEDY))
    assert "".join(pieces) == REPLY and len(pieces) > 5
    info = remote.model_info()
    assert f"`{MODEL_NAME}`" in info and "owned_by: lmforge" in info and "context_length: 128" in info
    remote.close()


def test_remote_backend_reports_a_wrong_key(served):
    with pytest.raises(UserError, match="answered 401: incorrect API key.*--api-key"):
        RemoteBackend(served.url + "/v1", api_key="wrong")


def test_remote_backend_reports_server_side_refusals(served):
    remote = RemoteBackend(served.url, api_key="secret")
    with pytest.raises(UserError, match="answered 400: max_tokens=500 is out of range"):
        list(remote.stream_reply(HELLO, ChatSettings(max_new_tokens=500)))
    remote.close()


def test_both_backends_drop_the_oldest_exchanges_of_a_conversation_too_long_for_the_context(tiny_chat):
    """The web page keeps chatting when the history outgrows the context: old exchanges go first,
    the system prompt and the new message stay; locally by counting, remotely on the server's
    context_length_exceeded answer."""
    model, tokenizer = tiny_chat
    history = []
    for turn in range(8):
        history += [{"role": "user", "content": f"q{turn}"},
                    {"role": "assistant", "content": f"a{turn}"}]
    conversation = [{"role": "system", "content": "Be brief."}, *history, *HELLO]
    settings = ChatSettings(temperature=0.0, top_p=1.0, max_new_tokens=16)
    kept, prompt_ids = fit_chat(tokenizer, 128, conversation, 16)
    assert kept[0]["role"] == "system" and kept[-1] == HELLO[0] and 2 < len(kept) < len(conversation)
    assert len(prompt_ids) <= 128 - 16
    expected = "".join(tiny_chat_engine(model, tokenizer).stream(prompt_ids, settings_params(settings)))

    strict = Engine(model, tokenizer, max_batch_size=2, context_policy="error")
    with pytest.raises(UserError, match="context of 128"):
        list(strict.stream_chat(conversation, settings_params(settings)))
    assert "".join(LocalBackend(strict, MODEL_NAME).stream_reply(conversation, settings)) == expected
    with BackgroundServer(create_app(Engine(model, tokenizer, max_batch_size=2, context_policy="error"),
                                     MODEL_NAME)) as server:
        remote = RemoteBackend(server.url)
        assert "".join(remote.stream_reply(conversation, settings)) == expected
        with pytest.raises(UserError, match="answered 400: the prompt has .* shorten the messages"):
            list(remote.stream_reply([{"role": "user", "content": "too long " * 200}], settings))
        remote.close()


def settings_params(settings: ChatSettings) -> SamplingParams:
    return SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                          top_p=settings.top_p)


def test_build_messages_from_gradio_history():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]},
        {"role": "assistant", "content": [{"type": "file", "file": {"path": "/tmp/x.png"}}]},
    ]
    assert build_messages("and now?", history, "  Be brief. ") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "and now?"},
    ]
    assert build_messages("x", [], "   ") == [{"role": "user", "content": "x"}]
    assert message_text("plain") == "plain" and message_text(None) == ""


def test_app_caps_max_tokens_at_the_context(local):
    app = build_web_app(local, defaults=ChatSettings(temperature=0.3, top_p=0.8, max_new_tokens=256))
    props = {c["props"].get("elem_id"): c["props"] for c in app.config["components"]}
    assert props["max-new-tokens"]["maximum"] == 127          # context 128 minus one prompt token
    assert props["max-new-tokens"]["value"] == 63             # 256 would leave little room: half the limit
    assert props["temperature"]["value"] == 0.3 and props["top-p"]["value"] == 0.8
    assert "parameters:" in props["model-info"]["value"]


def test_launch_on_a_busy_port_is_a_user_error(local):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=rf"127.0.0.1:{port} \(the port is already in use\); pick a free port"):
            launch(build_web_app(local), host="127.0.0.1", port=port, block=False)


def test_web_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["web", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:\n  lmforge web --model smollm2-135m-instruct" in out
    assert "--server-url" in out and "--api-key" in out and "127.0.0.1" in out and "7860" in out


@pytest.mark.parametrize("argv, message", [
    (["web", "--model", "nano", "--api-key", "k"], "--api-key and --server-model only apply to --server-url"),
    (["web", "--model", "nano", "--port", "0"], "--port 0 is not a TCP port"),
    (["web", "--server-url", "localhost:8000"], "server URL 'localhost:8000' is not an http(s) URL"),
])
def test_web_bad_arguments_are_user_errors(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_web_needs_a_model_or_a_server(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["web"])
    assert exit_info.value.code == 2
    assert "one of the arguments --model --server-url is required" in capsys.readouterr().err
