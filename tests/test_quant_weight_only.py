"""Weight-only int8 / Q4_0 (lmforge.quant.weight_only): the formats by hand, and torch's CPU
kernels (the fast path) against the dequantized reference (the readable path)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.quant.weight_only import (Int8WeightLinear, Q4Linear, dequantize_int8, dequantize_q4, has_int4_kernel,
                                       has_int8_kernel, pack_nibbles, quantize_int8, quantize_q4_0, quantize_q4_1, unpack_nibbles)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_per_channel_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0], [2.0, 1.0, -2.0, 0.01]])
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and codes[0].tolist() == [64, -127, 32, 0] and codes[1, 0] == 127
    assert torch.allclose(scale, torch.tensor([1.0, 2.0]) / 127)
    err = (dequantize_int8(codes, scale) - w).abs()
    assert (err <= scale.unsqueeze(1) / 2 + 1e-7).all()          # at most half a step per row


def test_q4_0_by_hand_matches_llama_cpp_rounding():
    block = torch.linspace(-0.5, 1.0, 32)                          # the extreme is +1.0
    codes, d = quantize_q4_0(block.view(1, 32))
    assert torch.allclose(d, torch.tensor([[-1.0 / 8]]))
    assert codes[0, -1] == 0                                       # the extreme is exact: (0 - 8) * d = 1.0
    expected = torch.clamp(torch.trunc(block / (-1 / 8) + 8.5), 0, 15)
    assert torch.equal(codes[0].float(), expected)
    w = dequantize_q4(codes, d)
    assert w[0, -1] == 1.0 and (w - block).abs().max() <= 1 / 16 + 1e-6
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def test_q4_1_gives_back_weights_that_were_q4_1_already():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    codes[:, 0::32], codes[:, 1::32] = 0, 15                     # each block spans the full range
    d, m = torch.rand(8, 2) * 0.01 + 1e-3, torch.randn(8, 2) * 0.05
    w = codes.view(8, 2, 32).float() * d[..., None] + m[..., None]
    codes2, d2, m2 = quantize_q4_1(w.view(8, 64))
    assert torch.equal(codes2, codes)
    torch.testing.assert_close(dequantize_q4(codes2, d2, m2 + 8 * d2), w.view(8, 64), atol=1e-6, rtol=0)


def test_q4_0_zero_block_and_shape_errors():
    codes, d = quantize_q4_0(torch.zeros(2, 64))
    assert (dequantize_q4(codes, d) == 0).all()
    with pytest.raises(UserError, match="divisible by 32"):
        quantize_q4_0(torch.randn(4, 40))
    with pytest.raises(UserError, match="2-D float"):
        quantize_int8(torch.randn(3, 4, 5))


@pytest.mark.skipif(not has_int8_kernel(), reason="this torch has no aten._weight_int8pack_mm")
@pytest.mark.parametrize("tokens", [1, 5])
def test_int8_kernel_matches_the_dequantized_reference(tokens):
    linear = nn.Linear(576, 192, bias=True)
    fast, slow = Int8WeightLinear.from_linear(linear), Int8WeightLinear.from_linear(linear, fast=False)
    assert fast.fast and not slow.fast
    x = torch.randn(2, tokens, 576)
    with torch.no_grad():
        reference = slow(x)
        got = fast(x)
        exact = linear(x)
    assert got.shape == (2, tokens, 192) and got.dtype == torch.float32
    # the kernel runs in bf16 (x rounded to 8 mantissa bits): agreement to bf16 precision
    torch.testing.assert_close(got, reference, atol=3e-2 * reference.abs().max().item(), rtol=0)
    torch.testing.assert_close(reference, exact, atol=2e-2, rtol=0)
    bf16_x = x.bfloat16().float()
    torch.testing.assert_close(got, nn.functional.linear(bf16_x, slow.dequantized_weight(), linear.bias),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not has_int4_kernel(), reason="this torch has no aten._weight_int4pack_mm_for_cpu")
@pytest.mark.parametrize("shape", [(576, 1536), (64, 96), (256, 64)])
def test_int4_kernel_matches_the_dequantized_reference(shape):
    in_features, out_features = shape
    linear = nn.Linear(in_features, out_features, bias=False)
    fast, slow = Q4Linear.from_linear(linear), Q4Linear.from_linear(linear, fast=False)
    assert fast.fast and torch.equal(fast.weight_q4, slow.weight_q4)
    x = torch.randn(3, in_features)
    with torch.no_grad():
        reference = nn.functional.linear(x.bfloat16().float(), slow.dequantized_weight())
        got = fast(x)
    torch.testing.assert_close(got, reference, atol=2e-2 * reference.abs().max().item(), rtol=0)


@pytest.mark.skipif(not has_int4_kernel(), reason="this torch has no aten._weight_int4pack_mm_for_cpu")
def test_int4_kernel_with_zero_points_is_gguf_q4_1_form():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    scales, mins = torch.rand(32, 2) * 0.01, torch.randn(32, 2) * 0.05
    zeros = mins + 8 * scales                                        # Q4_1: d * q + m = (q - 8) * d + (m + 8 d)
    layer = Q4Linear(codes, scales, zeros)
    w = dequantize_q4(codes, scales, zeros)
    assert torch.allclose(w.view(32, 2, 32), codes.view(32, 2, 32) * scales[..., None] + mins[..., None], atol=1e-6)
    x = torch.randn(1, 64)
    torch.testing.assert_close(layer(x), x.bfloat16().float() @ w.t(), atol=2e-2, rtol=2e-2)


def test_state_dict_holds_the_portable_format_only():
    layer = Q4Linear.from_linear(nn.Linear(64, 32))
    assert set(layer.state_dict()) == {"weight_q4", "scales", "zeros", "bias"}
    assert layer.state_dict()["weight_q4"].shape == (32, 32)
    assert set(Int8WeightLinear.from_linear(nn.Linear(64, 32)).state_dict()) == {"weight_int8", "scale", "bias"}
