"""Activation-aware 4-bit rounding (lmforge.quant.calibrate): the weighted block-scale search for
Q4_0 and NF4, the input statistics it uses, quantize_model / --calibrate, and its errors."""
from __future__ import annotations

import types

import bitsandbytes.functional as bnbf   # the `test` extra pins it: NF4 with searched scales must still read
import pytest
import torch
from torch import nn

from infer_support import load_tiny, tiny_model_dir
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.infer import Engine, SamplingParams
from lmforge.quant import quantize_model
from lmforge.quant.calibrate import calibration_ids, input_importance, nf4_block_scales, q4_0_weighted
from lmforge.quant.nf4 import dequantize_nf4, quantize_nf4
from lmforge.quant.quantize import apply_precision
from lmforge.quant.weight_only import Q4Linear, dequantize_q4, quantize_q4_0

pytestmark = pytest.mark.usefixtures("one_thread")


def _weight_and_importance(out_features=24, in_features=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    weight[:, 5] *= 8                                                   # a heavy column, as in real layers
    importance = torch.rand(in_features, generator=generator) ** 4     # a few features carry the energy
    importance[[3, 40, 77]] = 50.0
    return weight, importance


def _block_error(weight, approx, importance, group):
    """Importance-weighted squared error per block [out, in/group]."""
    diff = (weight - approx).square() * importance
    return diff.view(weight.shape[0], -1, group).sum(dim=2)


def test_q4_0_search_is_never_worse_than_round_to_nearest_and_keeps_the_format():
    weight, importance = _weight_and_importance()
    codes, scales = q4_0_weighted(weight, importance)
    assert codes.dtype == torch.uint8 and codes.shape == weight.shape and int(codes.max()) <= 15
    assert scales.shape == (24, 128 // 32)
    searched = dequantize_q4(codes, scales)
    nearest = dequantize_q4(*quantize_q4_0(weight))
    ours, rtn = _block_error(weight, searched, importance, 32), _block_error(weight, nearest, importance, 32)
    assert (ours <= rtn * (1 + 1e-5) + 1e-12).all()                     # round-to-nearest is a candidate
    assert ours.sum() < 0.8 * rtn.sum()
    layer = Q4Linear(codes, scales, fast=False)                        # the layer stores them unchanged
    torch.testing.assert_close(layer.dequantized_weight(), searched)


def test_q4_0_blocks_of_zero_importance_keep_round_to_nearest():
    weight, importance = _weight_and_importance()
    importance[32:64] = 0.0                                            # block 1 of every row is never read
    codes, scales = q4_0_weighted(weight, importance)
    rtn_codes, rtn_scales = quantize_q4_0(weight)
    assert torch.equal(scales[:, 1], rtn_scales[:, 1])
    assert torch.equal(codes[:, 32:64].long() - 8, torch.round(weight[:, 32:64] / rtn_scales[:, 1:2]).clamp(-8, 7).long())
    assert not torch.equal(scales, rtn_scales)                          # the other blocks did move


def test_nf4_searched_scales_lower_the_weighted_error_and_bitsandbytes_reads_them():
    weight, importance = _weight_and_importance(in_features=192)
    scale = nf4_block_scales(weight, importance)
    assert scale.shape == (24 * 192 // 64,) and (scale > 0).all()
    searched = quantize_nf4(weight, double_quant=False, scale=scale)
    nearest = quantize_nf4(weight, double_quant=False)
    error = lambda q: ((dequantize_nf4(q) - weight).square() * importance).sum()  # noqa: E731
    assert error(searched) < 0.8 * error(nearest)
    assert torch.equal(searched.absmax, scale)
    state = bnbf.QuantState(absmax=scale, shape=weight.shape, code=bnbf.get_4bit_type("nf4", device="cpu"),
                            blocksize=64, quant_type="nf4", dtype=torch.float32)
    ref = bnbf.dequantize_4bit(searched.data.view(-1, 1), state, quant_type="nf4")
    torch.testing.assert_close(dequantize_nf4(searched), ref, atol=1e-6, rtol=0)
    double = quantize_nf4(weight, scale=scale)                          # double quantization of those scales
    assert error(double) < 0.85 * error(nearest)


def test_input_importance_is_the_mean_square_of_each_linear_input():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(max_seq_len=4)
            self.embed = nn.Embedding(10, 6)
            self.proj = nn.Linear(6, 3)

        def forward(self, ids):
            return self.proj(self.embed(ids))

    toy = Toy()
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]                               # 2 windows of 4; the tail is dropped
    importance = input_importance(toy, ids, batch_size=1)
    assert set(importance) == {"proj"}
    expected = toy.embed.weight[torch.tensor(ids[:8])].detach().square().mean(dim=0)
    torch.testing.assert_close(importance["proj"], expected)
    assert not toy.proj._forward_pre_hooks                               # the hooks are removed


@pytest.mark.parametrize("method", ["q4_0", "nf4"])
def test_calibrated_model_is_closer_to_fp32_on_the_calibration_text(method):
    model, tokenizer = load_tiny()
    ids = calibration_ids(tokenizer, 512)
    batch = torch.tensor(ids[:256]).view(2, 128)
    with torch.no_grad():
        reference = model(batch)
    errors = {}
    for label, calibration in (("nearest", None), ("calibrated", ids)):
        quantized, summary = quantize_model(load_tiny()[0], method, return_summary=True, calibration_ids=calibration)
        with torch.no_grad():
            errors[label] = (quantized(batch) - reference).square().mean().item()
        assert summary.calibration_tokens == (0 if calibration is None else 512)
    assert errors["calibrated"] < errors["nearest"]


def test_calibration_ids_are_wikipedia_text():
    _, tokenizer = load_tiny()
    ids = calibration_ids(tokenizer, 300)
    assert len(ids) == 300
    from lmforge.rag.corpus import wiki_documents

    assert tokenizer.decode(ids).startswith(wiki_documents()[0].text[:40])
    with pytest.raises(UserError, match="calibration tokens 0 is below 1"):
        calibration_ids(tokenizer, 0)


def test_calibration_ids_wiki_and_chat_is_half_each():
    _, tokenizer = load_tiny()
    ids = calibration_ids(tokenizer, 301, "wiki+chat")
    assert len(ids) == 301
    assert ids[:151] == calibration_ids(tokenizer, 151)                 # the Wikipedia half comes first
    from lmforge.data.chat_corpora import load_sharegpt

    first = load_sharegpt(limit=1)[0][0].messages[0]["content"]
    assert tokenizer.decode(ids[151:]).startswith(first[:40])           # then the first ShareGPT conversation


def test_calibration_ids_from_a_text_file(tmp_path):
    _, tokenizer = load_tiny()
    path = tmp_path / "domain.txt"
    path.write_text("To be, or not to be, that is the question. " * 20, encoding="utf-8")
    ids = calibration_ids(tokenizer, 50, str(path))
    assert ids == tokenizer.encode(path.read_text(encoding="utf-8"))[:50]
    with pytest.raises(UserError, match="has only .* tokens; ask for .* or fewer, or pass a longer file"):
        calibration_ids(tokenizer, 100_000, str(path))
    with pytest.raises(UserError, match="is neither wiki nor wiki\\+chat nor a file"):
        calibration_ids(tokenizer, 50, str(tmp_path / "missing.txt"))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="pass a UTF-8 .txt file"):
        calibration_ids(tokenizer, 50, str(tmp_path / "binary.txt"))


def test_generate_with_calibration_text_end_to_end(capsys, tmp_path):
    model, tokenizer = load_tiny()
    path = tmp_path / "domain.txt"
    path.write_text("JULIET: O Romeo, Romeo, wherefore art thou Romeo? " * 30, encoding="utf-8")
    quantize_model(model, "q4_0", calibration_ids=calibration_ids(tokenizer, 128, str(path)))
    expected = Engine(model, tokenizer).generate(["ROMEO:"], SamplingParams(max_new_tokens=8, temperature=0))[0].text
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--temperature", "0", "--quantize", "q4_0", "--calibrate", "128", "--calibration-text", str(path)])
    out, err = capsys.readouterr()
    assert code == 0 and out == expected + "\n" and f"'{path}' tokens" in err
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", "x", "--quantize", "q4_0",
                 "--calibrate", "128", "--calibration-text", str(tmp_path / "missing.txt")])
    assert code != 0 and "is neither wiki nor wiki+chat nor a file" in capsys.readouterr().err


def test_generate_with_calibrate_end_to_end(capsys):
    model, tokenizer = load_tiny()
    quantize_model(model, "q4_0", calibration_ids=calibration_ids(tokenizer, 256))
    expected = Engine(model, tokenizer).generate(["ROMEO:"], SamplingParams(max_new_tokens=8, temperature=0))[0].text
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--temperature", "0", "--quantize", "q4_0", "--calibrate", "256"])
    out, _ = capsys.readouterr()
    assert code == 0 and out == expected + "\n"


@pytest.mark.parametrize("argv,message", [
    (["--calibrate", "256"], "--calibrate applies to --quantize nf4 or q4_0"),
    (["--quantize", "int8", "--calibrate", "256"], "--calibrate applies to --quantize nf4 or q4_0"),
    (["--quantize", "q4_0", "--calibrate", "-1"], "--calibrate -1 is below 0"),
    (["--quantize", "q4_0", "--calibration-text", "wiki+chat"],
     "--calibration-text wiki+chat needs --calibrate TOKENS"),
    (["--calibration-text", "wiki"], "--calibration-text wiki needs --calibrate TOKENS"),
])
def test_bad_calibrate_values_are_clear_errors(capsys, argv, message):
    code = main(["generate", "--model", str(tiny_model_dir()), "--prompt", "x"] + argv)
    assert code != 0 and message in capsys.readouterr().err


def test_calibration_for_a_method_it_does_not_apply_to_is_a_user_error():
    model, tokenizer = load_tiny()
    with pytest.raises(UserError, match="calibration applies to nf4 and q4_0, not 'int8'"):
        quantize_model(model, "int8", calibration_ids=[1, 2, 3])
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        apply_precision(model, "fp32", "q4_0", calibrate=64)
