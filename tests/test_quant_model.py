"""quantize_model on a tiny model (logits close to fp32, every Linear swapped, the compiled decode
step still works) and `--quantize` / `--dtype` on `lmforge generate` end to end."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from infer_support import load_tiny, tiny_model_dir
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.infer import Engine, SamplingParams
from lmforge.quant import quantize_model
from lmforge.quant.quantize import apply_precision

pytestmark = pytest.mark.usefixtures("one_thread")

# relative logit error allowed per method: 8-bit is tight, 4-bit looser (measured ~0.5% / ~6%)
TOLERANCE = {"int8": 0.02, "llm-int8": 0.02, "nf4": 0.15, "q4_0": 0.15, "q4_1": 0.15}


@pytest.mark.parametrize("method", ["int8", "llm-int8", "nf4", "q4_0", "q4_1"])
def test_quantized_logits_close_to_fp32(method):
    model, tokenizer = load_tiny()
    ids = torch.tensor([tokenizer.encode("ROMEO: But soft, what light through yonder window")])
    with torch.no_grad():
        reference = model(ids)
    model, summary = quantize_model(model, method, return_summary=True)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert summary.kept == [] and "lm_head" in summary.quantized
    assert summary.weight_bytes_after < summary.weight_bytes_before / (3 if "int8" in method else 4)
    head = type(model.lm_head).__name__
    assert head == ("Int8Linear" if method == "llm-int8" else "Int8WeightLinear")   # 4-bit methods: int8 head
    with torch.no_grad():
        logits = model(ids)
    error = ((logits - reference).norm() / reference.norm()).item()
    assert error < TOLERANCE[method], (method, error)
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow   # torch.compile takes minutes on a busy 2-core machine
@pytest.mark.parametrize("method", ["int8", "q4_0"])
def test_compiled_decode_step_runs_the_quantized_kernels(method):
    model, tokenizer = load_tiny()
    prompt = tokenizer.encode("ROMEO:")
    params = SamplingParams(max_new_tokens=8, temperature=0)
    quantize_model(model, method)
    eager = Engine(model, tokenizer, max_batch_size=1, max_seq_len=32).generate([prompt], params)[0].token_ids
    compiled = Engine(model, tokenizer, max_batch_size=1, max_seq_len=32, compile=True)
    assert compiled.generate([prompt], params)[0].token_ids == eager


def test_head_bits_4_quantizes_the_output_layer_to_4_bits_too():
    model, _ = load_tiny()
    quantize_model(model, "q4_0", head_bits=4)
    assert type(model.lm_head).__name__ == "Q4Linear"


def test_bf16_model_generates():
    model, tokenizer = load_tiny()
    model = apply_precision(model, "bf16", "int8")
    assert model.transformer.embed_tokens.weight.dtype == torch.bfloat16
    result = Engine(model, tokenizer, max_batch_size=1).generate(["ROMEO:"], SamplingParams(max_new_tokens=5))[0]
    assert result.completion_tokens == 5


@pytest.mark.parametrize("method", ["int8", "q4_0", "q4_1", "nf4"])
def test_generate_with_quantize_end_to_end(capsys, method):
    model, tokenizer = load_tiny()
    quantize_model(model, method)
    expected = Engine(model, tokenizer).generate(["ROMEO:"], SamplingParams(max_new_tokens=8, temperature=0))[0].text
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--temperature", "0", "--quantize", method])
    out, _ = capsys.readouterr()
    assert code == 0 and out == expected + "\n"


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int4"], "invalid choice: 'int4'"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
])
def test_bad_quantize_values_exit_2_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tiny_model_dir()), "--prompt", "x"] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_method_in_python_is_a_user_error():
    model, _ = load_tiny()
    with pytest.raises(UserError, match="unknown quantization method 'int4'; choose one of int8, llm-int8, nf4, q4_0"):
        quantize_model(model, "int4")
    with pytest.raises(UserError, match="unknown --dtype"):
        apply_precision(model, "fp8")
