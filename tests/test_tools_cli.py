"""--tools on `lmforge generate` and `lmforge chat`, with the scripted model standing in for a real one."""
from __future__ import annotations

import pytest

from lmforge.cli import main
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.chat_command import ChatSession
from lmforge.infer.tools import ToolRegistry
from tools_support import scripted_model

pytestmark = pytest.mark.usefixtures("one_thread")


def script(context: str) -> str:
    return " so 5." if "→ 5]" in context else "It is [calculator(2+3)→"


@pytest.fixture
def scripted(monkeypatch):
    model, tokenizer = scripted_model(script)
    monkeypatch.setattr("lmforge.model.loading.load", lambda ref, device=None: (model, tokenizer))
    return model


def test_generate_with_tools_streams_the_inserted_result_and_lists_calls(scripted, capsys):
    code = main(["generate", "--model", "scripted", "--prompt", "2+3?", "--chat", "--tools", "calculator",
                 "--temperature", "0", "--max-new-tokens", "40"])
    out, err = capsys.readouterr()
    assert code == 0 and out == "It is [calculator(2+3)→ 5] so 5.\n"
    assert "[tool 0: [calculator(2+3)) -> 5]" in err
    assert "calculator(expression)" in scripted.prompts[0]   # the tools are described in the system prompt
    code = main(["generate", "--model", "scripted", "--prompt", "a", "--prompt", "b", "--tools", "calculator",
                 "--temperature", "0", "--max-new-tokens", "40"])
    out, _ = capsys.readouterr()
    assert code == 0 and out.count("[calculator(2+3)→ 5] so 5.") == 2


@pytest.mark.parametrize("argv, message", [
    (["--tools", "shell"], "unknown tool 'shell'"),
    (["--tools", "retrieval"], "needs an index"),
    (["--tools", "retrieval", "--tool-index", "/nonexistent/index"], "does not exist"),
])
def test_bad_tools_exit_2_with_one_line(scripted, capsys, argv, message):
    code = main(["generate", "--model", "scripted", "--prompt", "x", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err


def test_chat_session_keeps_the_tool_turn_as_text():
    model, tokenizer = scripted_model(script)
    session = ChatSession(Engine(model, tokenizer, max_batch_size=1), SamplingParams(max_new_tokens=40), "Be brief.",
                          ToolRegistry.builtin("calculator"))
    assert "".join(session.reply("2+3?")) == "It is [calculator(2+3)→ 5] so 5."
    assert session.turns[-1] == {"role": "assistant", "content": "It is [calculator(2+3)→ 5] so 5."}
    assert session.messages()[0]["content"].startswith("Be brief.\n\nYou can call tools")
    assert len(session.turns) == 2
