"""`lmforge generate` and `lmforge chat` on the tiny trained model."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from infer_support import load_tiny, tiny_model_dir
from lmforge.cli import main
from lmforge.infer import Engine, SamplingParams, render_chat


pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_streams_the_engine_output(capsys):
    model, tokenizer = load_tiny()
    expected = Engine(model, tokenizer).generate(["ROMEO:"], SamplingParams(max_new_tokens=10))[0].text
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", "ROMEO:", "--max-new-tokens", "10",
                 "--temperature", "0", "--stats"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == expected + "\n"
    assert "tokens/s" in err


def test_generate_with_prompt_lookup_prints_the_same_text(capsys):
    model, tokenizer = load_tiny()
    prompt = "the king the king the king the king the"
    expected = Engine(model, tokenizer).generate([prompt], SamplingParams(max_new_tokens=24))[0].text
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", prompt, "--max-new-tokens", "24",
                 "--temperature", "0", "--prompt-lookup", "4", "--stats"])
    out, err = capsys.readouterr()
    assert code == 0 and out == expected + "\n"
    assert "prompt lookup kept" in err
    assert main(["generate", "--model", str(tiny_model_dir()), "--prompt", "x", "--prompt-lookup", "-1"]) == 2
    assert "--prompt-lookup -1 is below 0" in capsys.readouterr().err


def test_generate_batch_and_chat_mode(capsys):
    model, tokenizer = load_tiny()
    params = SamplingParams(max_new_tokens=6, temperature=0.9, seed=4)
    chat_prompt = render_chat(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    expected = Engine(model, tokenizer).generate([chat_prompt], params)[0].text
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", "Hi", "--prompt", "Hi", "--chat",
                 "--system", "Be brief.", "--max-new-tokens", "6", "--temperature", "0.9", "--top-p", "1", "--seed", "4"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert out == f"--- [0] 'Hi'\n{expected}\n--- [1] 'Hi'\n{expected}\n"


def test_generate_bad_settings_exit_2_with_one_line(capsys):
    assert main(["generate", "--model", str(tiny_model_dir()), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "--model", "no/such/model", "--prompt", "x"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["generate", "--device", "bogus"], "device 'bogus' is not a device name"),
    (["generate", "--device", "cuda:0"], "CUDA is not available"),
    (["generate", "--threads", "0"], "--threads 0 is below 1"),
    (["generate", "--seed", str(2**64)], "seed must be an integer between"),
    # Values that once passed validation and then raised inside the decode step (a traceback).
    (["generate", "--temperature", "inf"], "temperature must be a finite number in [0, 100]"),
    (["generate", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "--top-k", str(2**63)], "top_k must be an integer from 0 (off) to 2147483647"),
    (["generate", "--repetition-penalty", "1e39"], "repetition_penalty must be in [0.01, 100]"),
    (["generate", "--frequency-penalty", "1e39"], "frequency_penalty must be in [-100, 100]"),
    (["generate", "--presence-penalty=-1e39"], "presence_penalty must be in [-100, 100]"),
    (["serve", "--max-sequences-per-request", "0"], "--max-sequences-per-request 0 is below 1"),
    (["serve", "--port", "70000"], "--port 70000 is not a TCP port"),
    (["serve", "--max-seq-len", "-5"], "--max-seq-len -5 is below 1"),
    (["serve", "--max-batch-size", "0"], "--max-batch-size 0 is below 1"),
])
def test_bad_command_line_values_exit_2_with_one_line(capsys, argv, message):
    if torch.cuda.is_available() and "cuda:0" in argv:
        pytest.skip("this machine has CUDA")
    extra = ["--prompt", "x", "--max-new-tokens", "2"] if argv[0] == "generate" else []
    assert main([*argv, "--model", str(tiny_model_dir()), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_chat_reports_a_message_too_long_for_the_context_and_keeps_chatting(capsys, monkeypatch):
    model, tokenizer = load_tiny()
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    expected = Engine(model, tokenizer).generate([render_chat(tokenizer, [{"role": "user", "content": "Hail"}])],
                                                 params)[0].text
    monkeypatch.setattr("sys.stdin", io.StringIO("hello " * 400 + "\nHail\n"))
    code = main(["chat", "--model", str(tiny_model_dir()), "--max-new-tokens", "5", "--temperature", "0",
                 "--context-policy", "error"])
    first_line, rest = capsys.readouterr().out.split("\n", 1)
    assert code == 0
    assert first_line.startswith("[error: the prompt has") and first_line.endswith("the turn was dropped]")
    assert rest == expected + "\n"   # the dropped turn is not part of the conversation


@pytest.mark.slow
def test_chat_keeps_turns_and_handles_commands_when_stdin_is_a_pipe():
    """A subprocess with piped stdin: two turns, /system, /reset, then one more turn."""
    model, tokenizer = load_tiny()
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=5)
    first = engine.generate([render_chat(tokenizer, [{"role": "user", "content": "Hail"}])], params)[0].text
    history = [{"role": "user", "content": "Hail"}, {"role": "assistant", "content": first},
               {"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "And then?"}]
    # /system sets the system prompt for the next turns; the template puts it first.
    second_prompt = render_chat(tokenizer, [history[2], *history[:2], history[3]])
    second = engine.generate([second_prompt], params)[0].text
    after_reset = engine.generate([render_chat(tokenizer, [history[2], {"role": "user", "content": "Hail"}])],
                                  params)[0].text

    script = "Hail\n/system Speak in verse.\nAnd then?\n/reset\nHail\n/bogus\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "lmforge", "chat", "--model", str(tiny_model_dir()), "--max-new-tokens", "8",
         "--temperature", "0.8", "--top-p", "1", "--seed", "5"],
        input=script, capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 0, completed.stderr
    # Replies may contain newlines themselves, so compare the text, not its lines.
    assert completed.stdout.startswith("\n".join([
        first, "[system prompt set]", second, "[conversation reset]", after_reset,
        "[unknown command /bogus; commands: /reset (new conversation), /system TEXT (set the system prompt), /exit]"]))
