"""AWQ channel scales folded into the previous operation (lmforge.quant.scaling): the fold changes
no output (norm weights and biases, v rows, up rows, and the adapters of a several-adapter model),
the chosen scale never has a larger weighted error than no scale, and NF4 with calibration folds."""
from __future__ import annotations

import copy

import pytest
import torch

from lmforge.model import build_model, get_preset
from lmforge.quant.calibrate import input_importance, nf4_weighted_fake_quant
from lmforge.quant.scaling import best_scale, fold_input_scales, output_error

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def _model(preset: str, **overrides):
    """A tiny model whose norms give a few input features large values (outliers, as real LMs have),
    with the norm weights and biases off their initial values so that every fold shows."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset, vocab_size=VOCAB, **overrides)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
            if "norm" in name and name.endswith("weight"):
                param.mul_(1 + 7 * (torch.rand(param.shape, generator=generator) > 0.9))
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(seed))


def _moments(model, second_moment: bool = True) -> dict[str, torch.Tensor]:
    return input_importance(model, _ids(1).flatten().tolist(), window=32, second_moment=second_moment)


@pytest.mark.parametrize("preset, overrides", [
    pytest.param("nano", {}, id="llama-swiglu-gqa"),
    pytest.param("nano", {"qkv_bias": True, "mlp_bias": True}, id="biases"),
    pytest.param("gpt2-nano", {}, id="gpt2-layernorm-gelu"),
])
def test_folding_changes_no_output_and_picks_real_scales(preset, overrides):
    model = _model(preset, **overrides)
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
    norms_before = [block.attn_norm.weight.clone() for block in model.transformer.blocks]
    importance = fold_input_scales(model, _moments(model), nf4_weighted_fake_quant)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-4, rtol=1e-4)
    changed = [not torch.equal(block.attn_norm.weight, norm) for block, norm in zip(model.transformer.blocks, norms_before)]
    assert any(changed)                                   # the fold really happened somewhere
    # What it returns is E[x^2] of the scaled inputs: measured again on the folded model, it agrees.
    again = _moments(model, second_moment=False)
    assert set(importance) == set(again)
    for name in importance:
        torch.testing.assert_close(importance[name], again[name], rtol=1e-3, atol=1e-6)


def test_folding_keeps_each_adapter_of_a_several_adapter_model(tmp_path):
    from lmforge.peft import LoRAConfig, apply_lora, save_adapter
    from lmforge.peft.multi_lora import load_adapters

    base = _model("nano")
    directories = {}
    for index, dora in enumerate([False, True]):
        adapted = copy.deepcopy(base)
        apply_lora(adapted, LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=dora))
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if name.endswith(".B"):
                    param.normal_(0, 0.3)
        directories[f"a{index}"] = str(save_adapter(adapted, tmp_path / f"a{index}"))
    multi = load_adapters(base, directories).eval()
    ids, mix = _ids(), [0, 1, 2, 1]
    with torch.no_grad(), multi.adapter_set.routed(mix):
        before = multi(ids)
    fold_input_scales(multi, _moments(multi), nf4_weighted_fake_quant)
    with torch.no_grad(), multi.adapter_set.routed(mix):
        torch.testing.assert_close(multi(ids), before, atol=1e-4, rtol=1e-4)


def test_the_chosen_scale_is_never_worse_than_none():
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    inputs = torch.randn(512, 128) * (1 + 10 * (torch.rand(128) > 0.95))     # a few outlier features
    moment = inputs.T @ inputs / len(inputs)
    scale, alpha = best_scale(weight, moment, nf4_weighted_fake_quant)
    plain = output_error(weight, moment, nf4_weighted_fake_quant)
    scaled = output_error(weight * scale[None], moment / (scale[:, None] * scale[None]), nf4_weighted_fake_quant)
    assert alpha > 0 and scaled < plain
    # The error is the mean squared output error on those inputs, computed directly.
    error = nf4_weighted_fake_quant(weight, torch.diagonal(moment)) - weight
    assert abs(plain - float((inputs @ error.T).square().sum(dim=1).mean())) < 1e-3 * plain
    uniform = torch.eye(128)                             # nothing to gain: alpha 0, s = 1
    scale, alpha = best_scale(weight, uniform, nf4_weighted_fake_quant)
    assert alpha == 0 and torch.equal(scale, torch.ones(128))


def test_nf4_with_calibration_folds_and_q4_0_does_not():
    from lmforge.quant import quantize_model

    ids = _ids(1).flatten().tolist()
    for method, folds in (("nf4", True), ("q4_0", False)):
        model = _model("nano")
        norm = model.transformer.blocks[0].attn_norm.weight.clone()
        quantize_model(model, method, calibration_ids=ids)
        assert (not torch.equal(model.transformer.blocks[0].attn_norm.weight, norm)) == folds, method
