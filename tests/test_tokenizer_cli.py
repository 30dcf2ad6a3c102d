"""`lmforge tokenizer train | encode | stats` through the CLI entry point."""
from __future__ import annotations

import json

import pytest

from lmforge import cli
from lmforge.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text("To be, or not to be, that is the question.\n" * 30, encoding="utf-8")
    (folder / "b.txt").write_text("Now is the winter of our discontent.\n" * 30, encoding="utf-8")
    return folder


def test_train_then_encode_then_stats(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps tables to the terminal width
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", "--input", str(corpus / "a.txt"), str(corpus / "b.txt"),
                     "--vocab-size", "300", "--out", str(out)]) == 0
    assert "saved" in capsys.readouterr().out
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size == 300 and "<|im_end|>" in tokenizer.special_tokens

    assert cli.main(["tokenizer", "encode", "--tokenizer", str(out), "to be<|endoftext|>"]) == 0
    printed = capsys.readouterr().out
    ids = tokenizer.encode("to be<|endoftext|>")
    assert json.dumps(ids).replace(" ", "") in printed.replace(" ", "").replace("\n", "")
    assert f"{len(ids)} tokens" in printed

    other = tmp_path / "other"
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "270",
                     "--special-tokens", "<|endoftext|>", "--pattern", "gpt4", "--out", str(other)]) == 0
    assert load_tokenizer(other).special_tokens == {"<|endoftext|>": 269}
    capsys.readouterr()
    assert cli.main(["tokenizer", "stats", "--tokenizer", str(out), "--input", str(corpus), "--compare", str(other)]) == 0
    printed = capsys.readouterr().out
    assert "bytes/token" in printed and "x the tokens of" in printed


@pytest.mark.parametrize("argv, message", [
    (["train", "--input", "missing.txt", "--vocab-size", "300", "--out", "x"], "does not exist"),
    (["train", "--input", "{corpus}", "--vocab-size", "200", "--out", "x"], "too small"),
    (["encode", "--tokenizer", "no/such/dir", "hi"], "does not exist"),
    (["stats", "--tokenizer", "no/such/dir", "--input", "{corpus}"], "does not exist"),
])
def test_bad_input_exits_2_with_one_clear_sentence(argv, message, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    argv = [arg.replace("{corpus}", str(corpus)) for arg in argv]
    assert cli.main(["tokenizer", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lmforge tokenizer: error:") and message in error
    assert cli.main(["tokenizer", "train", "--input", str(empty), "--vocab-size", "300", "--out", "x"]) == 2
    assert "is empty" in capsys.readouterr().err
