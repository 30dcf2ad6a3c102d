"""Saved quantized models: `lmforge convert --quantize` writes the codes and scales in the lmforge
format, and `lmforge.load` / `--model DIR` rebuild the quantized layers from config.json."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from infer_support import load_tiny, tiny_model_dir
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.model.loading import export, save_pretrained
from lmforge.quant.quantize import apply_precision

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_types(model) -> list[tuple[str, str]]:
    """(name, class) of every leaf module: which layers are quantized, and how."""
    return [(name, type(module).__name__) for name, module in model.named_modules() if not list(module.children())]


@pytest.mark.parametrize("method,calibrate", [("q4_0", 256), ("q4_1", 0), ("int8", 0), ("nf4", 256)])
def test_a_saved_quantized_model_loads_back_identical(tmp_path, method, calibrate):
    model, tokenizer = load_tiny()
    model = apply_precision(model, None, method, calibrate=calibrate, tokenizer=tokenizer)
    save_pretrained(model, tokenizer, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["method"] == method and config["quantization"]["head_bits"] == 8
    assert config["quantization"]["recipe"]["calibrate"] == calibrate
    loaded, loaded_tokenizer = lmforge.load(tmp_path / "q")
    assert loaded.quantization == method and loaded_tokenizer.encode("ROMEO:") == tokenizer.encode("ROMEO:")
    assert linear_types(loaded) == linear_types(model)
    x = torch.tensor([tokenizer.encode("ROMEO: what light through yonder window")])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    stored = sum(t.numel() * t.element_size() for t in load_file(tmp_path / "q" / "model.safetensors").values())
    floats = sum(p.numel() * 4 for p in load_tiny()[0].parameters())
    assert stored < floats                                            # the file holds codes, not floats


def test_convert_with_tune_steps_then_generate_equals_quantizing_at_load(tmp_path, capsys):
    tiny = str(tiny_model_dir())
    recipe = ["--quantize", "q4_0", "--calibrate", "512", "--tune-steps", "2"]
    assert main(["convert", tiny, "--to", str(tmp_path / "q")] + recipe) == 0
    assert "lmforge (q4_0)" in capsys.readouterr().out
    prompt = ["--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["generate", "--model", tiny] + prompt + recipe) == 0
    at_load = capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "q")] + prompt) == 0
    saved = capsys.readouterr()
    assert saved.out == at_load and "quantizing" not in saved.err
    recipe_saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["recipe"]
    assert recipe_saved == {"calibrate": 512, "tune_steps": 2, "calibration_text": "wiki"}


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "q4_0", "--format", "hf"], "--quantize saves in the lmforge format only"),
    (["--quantize", "q4_0", "--dtype", "bf16"], "leave out --dtype"),
    (["--quantize", "int8", "--tune-steps", "3"], "--tune-steps trains the scales of --quantize q4_0"),
])
def test_bad_convert_quantize_options_are_clear_errors(tmp_path, capsys, argv, message):
    code = main(["convert", str(tiny_model_dir()), "--to", str(tmp_path / "out")] + argv)
    assert code != 0 and message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_quantized_model_is_not_quantized_again_or_cast(tmp_path, capsys):
    model, tokenizer = load_tiny()
    save_pretrained(apply_precision(model, None, "q4_0"), tokenizer, tmp_path / "q")
    code = main(["generate", "--model", str(tmp_path / "q"), "--prompt", "x", "--quantize", "int8"])
    assert code != 0 and "already quantized (q4_0)" in capsys.readouterr().err
    with pytest.raises(UserError, match="loads as saved; leave out the dtype"):
        lmforge.load(tmp_path / "q", dtype="bf16")
    with pytest.raises(UserError, match="saves in the lmforge format only"):
        export(lmforge.load(tmp_path / "q")[0], tokenizer, tmp_path / "hf", format="hf")


def test_damaged_quantized_directories_are_clear_errors(tmp_path):
    model, tokenizer = load_tiny()
    save_pretrained(apply_precision(model, None, "q4_0"), tokenizer, tmp_path / "q")
    config_file, weights = tmp_path / "q" / "config.json", tmp_path / "q" / "model.safetensors"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "quantization": {"method": "q3_k"}}))
    with pytest.raises(UserError, match="quantization method 'q3_k'"):
        lmforge.load(tmp_path / "q")
    config_file.write_text(json.dumps(config))
    state = load_file(weights)
    name = next(n for n in state if n.endswith("weight_q4"))
    save_file({n: t for n, t in state.items() if n != name}, weights)
    with pytest.raises(UserError, match=f"lacks the tensor '{name}'"):
        lmforge.load(tmp_path / "q")
    save_file({**state, name: state[name][:, :2].contiguous()}, weights)
    with pytest.raises(UserError, match=f"tensor '{name}' .* the weights and config.json do not match"):
        lmforge.load(tmp_path / "q")
