"""Scale tuning (lmforge.quant.tune): Q4_0's block scales trained against the float model through
the Trainer and the distillation objective, with the codes kept; --tune-steps and its errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from infer_support import load_tiny, tiny_model_dir
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.infer import Engine, SamplingParams
from lmforge.quant import quantize_model, tune_scales
from lmforge.quant.calibrate import calibration_ids
from lmforge.quant.quantize import apply_precision
from lmforge.quant.nf4 import NF4Linear, dequantize_nf4
from lmforge.quant.tune import CalibrationWindows, TunableNF4Linear, TunableQ4Linear
from lmforge.quant.weight_only import Int8WeightLinear, Q4Linear, quantize_q4_0

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl_to(teacher, model, ids: list[int]) -> float:
    """Mean KL(teacher || model) per token over windows of 64 of `ids`."""
    batch = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    with torch.no_grad():
        target = F.log_softmax(teacher(batch).float(), dim=-1)
        ours = F.log_softmax(model(batch).float(), dim=-1)
    return (target.exp() * (target - ours)).sum(-1).mean().item()


def test_tunable_layer_starts_as_the_q4_layer_and_gives_its_trained_scales_back():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator) * 0.05
    layer = Q4Linear(*quantize_q4_0(weight), bias=torch.randn(48, generator=generator), fast=False)
    tunable = TunableQ4Linear(layer)
    x = torch.randn(3, 64, generator=generator)
    torch.testing.assert_close(tunable(x), layer(x))
    assert [name for name, _ in tunable.named_parameters() if _.requires_grad] == ["log_gain"]
    with torch.no_grad():
        tunable.log_gain[0, 1] = 0.1                                   # one block of row 0 grows by e^0.1
    tuned = tunable.tuned()
    assert torch.equal(tuned.weight_q4, layer.weight_q4)              # the codes stay
    expected = layer.scales.clone()
    expected[0, 1] *= torch.tensor(0.1).exp()
    torch.testing.assert_close(tuned.scales, expected)
    torch.testing.assert_close(tuned(x), tunable(x))
    assert "levels" not in tunable.state_dict()                      # the float copy of the codes is not saved


def test_tunable_nf4_layer_starts_as_the_nf4_layer_and_bitsandbytes_reads_the_tuned_one():
    import bitsandbytes.functional as bnbf

    generator = torch.Generator().manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(128, 40))
    tunable = TunableNF4Linear(layer)
    x = torch.randn(3, 128, generator=generator)
    torch.testing.assert_close(tunable(x), layer(x))
    with torch.no_grad():
        tunable.log_gain[5] = 0.1                                       # block 5 (row 2's second half) grows
    tuned = tunable.tuned()
    assert torch.equal(tuned.weight_data, layer.weight_data)           # the codes stay
    assert tuned.qweight.double_quant                                  # the new absmax is 8-bit again
    torch.testing.assert_close(tuned(x), tunable(x), rtol=0.02, atol=1e-3)   # up to its 8-bit rounding
    q = tuned.qweight
    state = bnbf.QuantState(absmax=q.block_absmax(), shape=q.shape, code=bnbf.get_4bit_type("nf4", device="cpu"),
                            blocksize=64, quant_type="nf4", dtype=torch.float32)
    ref = bnbf.dequantize_4bit(q.data.view(-1, 1), state, quant_type="nf4")
    torch.testing.assert_close(dequantize_nf4(q), ref, atol=1e-6, rtol=0)


def test_calibration_windows_are_next_token_batches_and_resume():
    ids = list(range(1000))
    windows = CalibrationWindows(ids, window=64, batch_size=3, seed=1)
    batch = windows.next_batch()
    assert batch["input_ids"].shape == (3, 64) and torch.equal(batch["labels"], batch["input_ids"] + 1)
    state = windows.state_dict()
    following = windows.next_batch()
    again = CalibrationWindows(ids, window=64, batch_size=3, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()["input_ids"], following["input_ids"])
    with pytest.raises(UserError, match="fewer than one window of 65"):
        CalibrationWindows(ids[:10], window=64, batch_size=1)


# (layer class, its codes, its stored scales) per method
LAYERS = {"q4_0": (Q4Linear, "weight_q4", "scales"), "nf4": (NF4Linear, "weight_data", "weight_absmax")}


@pytest.mark.parametrize("method", ["q4_0", "nf4"])
def test_tuning_brings_the_quantized_model_closer_to_the_float_one_and_keeps_the_codes(method):
    kind, codes_name, scales_name = LAYERS[method]
    teacher, tokenizer = load_tiny()
    ids = calibration_ids(tokenizer, 2048)
    model = quantize_model(copy.deepcopy(teacher), method, calibration_ids=ids)
    codes = {name: getattr(m, codes_name).clone() for name, m in model.named_modules() if isinstance(m, kind)}
    scales = {name: getattr(m, scales_name).clone() for name, m in model.named_modules() if isinstance(m, kind)}
    floats = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    held_out = calibration_ids(tokenizer, 3072)[2048:]                 # text the tuning never saw
    before, before_held_out = _kl_to(teacher, model, ids), _kl_to(teacher, model, held_out)
    history = tune_scales(model, teacher, ids, steps=12, lr=3e-3, window=64, progress=False)
    after, after_held_out = _kl_to(teacher, model, ids), _kl_to(teacher, model, held_out)
    assert len(history) == 12 and after < 0.9 * before and after_held_out < before_held_out
    layers = {name: m for name, m in model.named_modules() if isinstance(m, kind)}
    tunables = (TunableQ4Linear, TunableNF4Linear)
    assert layers.keys() == codes.keys() and not any(isinstance(m, tunables) for m in model.modules())
    for name, layer in layers.items():
        assert torch.equal(getattr(layer, codes_name), codes[name])
        assert getattr(layer, "fast", True)                           # Q4_0's packed kernel is back
    assert any(not torch.equal(getattr(layers[name], scales_name), scales[name]) for name in layers)
    assert floats.keys() == dict(model.named_parameters()).keys()
    for name, param in model.named_parameters():       # embeddings, norms: untouched, as trainable as before
        assert torch.equal(param.detach(), floats[name][0]) and param.requires_grad == floats[name][1]
    assert all(m.fast for m in model.modules() if isinstance(m, Int8WeightLinear))


def test_tuning_is_reproducible():
    teacher, tokenizer = load_tiny()
    ids = calibration_ids(tokenizer, 1024)
    runs = []
    for _ in range(2):
        model = quantize_model(copy.deepcopy(teacher), "q4_0", calibration_ids=ids)
        tune_scales(model, teacher, ids, steps=3, window=64, progress=False)
        runs.append([m.scales for m in model.modules() if isinstance(m, Q4Linear)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_generate_with_tune_steps_equals_the_python_api(capsys):
    model, tokenizer = load_tiny()
    model = apply_precision(model, "fp32", "q4_0", calibrate=512, tokenizer=tokenizer, tune_steps=2)
    expected = Engine(model, tokenizer).generate(["ROMEO:"], SamplingParams(max_new_tokens=8, temperature=0))[0].text
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--temperature", "0", "--quantize", "q4_0", "--calibrate", "512", "--tune-steps", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and out == expected + "\n" and "then 2 steps of scale tuning" in err


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "q4_0", "--tune-steps", "5"], "--tune-steps trains the scales of --quantize q4_0"),
    (["--quantize", "int8", "--calibrate", "256", "--tune-steps", "5"], "of --quantize q4_0 or nf4 on the --calibrate"),
    (["--quantize", "q4_0", "--calibrate", "256", "--tune-steps", "-1"], "--tune-steps -1 is below 0"),
])
def test_bad_tune_steps_are_clear_errors(capsys, argv, message):
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", "x"] + argv)
    assert code != 0 and message in capsys.readouterr().err


def test_tuning_a_model_that_is_not_q4_0_is_a_user_error():
    model, tokenizer = load_tiny()
    with pytest.raises(UserError, match="quantize with q4_0 or nf4 first"):
        tune_scales(model, model, [1] * 300, steps=1)
    quantize_model(model, "int8")
    with pytest.raises(UserError, match="not 'int8'"):
        tune_scales(model, model, [1] * 300, steps=1)


def test_lab_reports_a_tuned_row(tmp_path, capsys):
    code = main(["quantize", "--model", str(tiny_model_dir()), "--out", str(tmp_path), "--methods",
                 "fp32,q4_0-cal,q4_0-tuned,nf4-tuned", "--calibrate", "512", "--tune-steps", "3", "--ppl-tokens", "257",
                 "--census-tokens", "64"])
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert code == 0 and "| q4_0-tuned |" in report and "| nf4-tuned |" in report
    assert "-tuned: the -cal row, then 3 steps training every block scale" in report
    code = main(["quantize", "--model", str(tiny_model_dir()), "--out", str(tmp_path), "--methods", "q4_0-tuned",
                 "--tune-steps", "0"])
    assert code != 0 and "--tune-steps 0 is below 1; the -tuned rows need" in capsys.readouterr().err
