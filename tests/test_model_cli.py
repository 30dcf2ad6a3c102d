"""`lmforge convert`, `lmforge inspect attention|io` and `lmforge model info` on tiny models, in-process."""
from __future__ import annotations

import json

import pytest

from lmforge.cli import build_command_parser, main
from lmforge.model import build_model, get_preset
from lmforge.model.loading import load, save_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT with its tokenizer, saved in the lmforge format."""
    from lmforge.tokenizer import train_bpe_on_texts

    tokenizer = train_bpe_on_texts(["the cat sat on the mat. the dog sat on the log."] * 10, vocab_size=290)
    root = tmp_path_factory.mktemp("cli")
    tokenizer.save(root / "tok")
    model = build_model(get_preset("nano", vocab_size=tokenizer.vocab_size))
    save_pretrained(model, tokenizer, root / "model")
    return root


def test_convert_to_lmforge_and_hf(saved, capsys):
    assert main(["convert", "nano", "--tokenizer", str(saved / "tok"), "--to", str(saved / "out")]) == 0
    assert "preset 'nano' (random weights) -> lmforge directory" in capsys.readouterr().out
    model, tokenizer = load(saved / "out")
    assert tokenizer is not None and model.config.vocab_size == tokenizer.vocab_size

    assert main(["convert", str(saved / "model"), "--to", str(saved / "hf"), "--format", "hf", "--dtype", "bf16"]) == 0
    assert "Hugging Face LlamaForCausalLM directory" in capsys.readouterr().out
    config = json.loads((saved / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in (saved / "hf").iterdir()}


def test_convert_errors_exit_2_with_one_line(saved, tmp_path, capsys):
    alibi = build_model(get_preset("nano", position="alibi"))
    save_pretrained(alibi, None, tmp_path / "alibi")
    assert main(["convert", str(tmp_path / "alibi"), "--to", str(tmp_path / "x"), "--format", "hf"]) == 2
    error = capsys.readouterr().err
    assert "lmforge convert: error:" in error and "position='alibi'" in error and "--format lmforge" in error
    assert main(["convert", "no-such-model", "--to", str(tmp_path / "y")]) == 2
    assert "is not a known model" in capsys.readouterr().err


def test_inspect_io_json_and_tables(saved, capsys):
    args = ["inspect", "io", "--model", str(saved / "model"), "--text", "the cat sat", "--top-k", "2"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "gpt" and report["clm_labels"][-1] == -100
    assert len(report["input_ids"]) == len(report["predictions"]) and len(report["predictions"][0]) == 2
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "input_ids" in out and "top predictions for the NEXT token" in out


def test_inspect_attention_writes_a_png(saved, tmp_path, capsys):
    out = tmp_path / "attn.png"
    assert main(["inspect", "attention", "--model", str(saved / "model"), "--text", "the cat sat on the mat",
                 "--layer", "0", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "previous token" in capsys.readouterr().out


def test_inspect_needs_a_tokenizer_for_presets(capsys):
    assert main(["inspect", "io", "--model", "nano", "--text", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_model_info_reads_our_directories(saved, capsys):
    assert main(["model", "info", str(saved / "model"), "--context", "64"]) == 0
    assert "grouped-query attention" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["convert"], ["inspect", "attention"], ["inspect", "io"]])
def test_help_ends_with_an_example(command, capsys):
    parser = build_command_parser(command[0])
    with pytest.raises(SystemExit):
        parser.parse_args(command[1:] + ["--help"])
    assert "example:\n  lmforge " + command[0] in capsys.readouterr().out


@pytest.mark.parametrize("option, value", [("--context", "-5"), ("--context", "0"), ("--batch-size", "0")])
def test_model_info_refuses_sizes_below_one(option, value, capsys):
    assert main(["model", "info", "nano", option, value]) == 2
    error = capsys.readouterr().err
    assert f"{option} must be at least 1, not {value}" in error and "leave it out" in error


def test_model_info_without_context_uses_the_models_own(capsys):
    assert main(["model", "info", "nano"]) == 0
    max_seq_len = get_preset("nano").max_seq_len
    assert f"@ {max_seq_len}" in capsys.readouterr().out


def test_convert_to_an_unwritable_place_names_the_to_option(saved, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["convert", str(saved / "model"), "--to", str(blocker / "out"), "--format", "hf"]) == 2
    error = capsys.readouterr().err
    assert "cannot write to output directory" in error and "with --to" in error and "--out" not in error


def test_inspect_attention_to_an_unwritable_place_is_a_user_error(saved, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["inspect", "attention", "--model", str(saved / "model"), "--text", "the cat",
                 "--out", str(blocker / "attn.png")]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err
