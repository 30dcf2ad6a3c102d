"""NF4 from scratch (lmforge.quant) against bitsandbytes' CPU backend: code book, packed bytes,
absmax (plain and double-quantized) and dequantized weights; and NF4Linear."""
from __future__ import annotations

import bitsandbytes.functional as bnbf   # the `test` extra pins it: the reference these tests check against
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError
from lmforge.quant import NF4Linear, NF4Tensor, dequantize_nf4, dynamic_code, nf4_code, quantize_nf4, unpack_nf4

SHAPES = [(64, 64), (33, 70), (5, 7), (257, 129), (3,), (2, 3, 100)]   # sizes off the block too


def _bnb(w: torch.Tensor, double_quant: bool):
    """bitsandbytes' packed bytes, quant state and dequantized weight for `w`.

    The dequantized weight comes from bitsandbytes' public `dequantize_4bit`, except for shapes whose
    last dimension is not a multiple of the block: there its AVX-512 C kernel disagrees with its own
    portable implementation (e.g. 40 x 96: rows 1+ read the wrong absmax; the AVX2 kernel agrees),
    so those use the portable one. Real Linear layers (in_features 576, 1536, ...) are multiples."""
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    if w.dim() < 2 or w.shape[-1] % 64 == 0:
        return packed, state, bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    with torch._dynamo.config.patch(disable=True):         # bitsandbytes compiles it per shape
        ref = _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), _get_4bit_code("nf4", w.device),
                                       64, state.shape, state.dtype)
    return packed, state, ref


def test_code_book_is_bitsandbytes_nf4():
    code = nf4_code()
    ref = bnbf.get_4bit_type("nf4", device="cpu")
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.allclose(code, ref, atol=1e-7, rtol=0)
    assert code[0] == -1 and code[-1] == 1 and code[7] == 0
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bitsandbytes(shape, double_quant):
    w = torch.randn(shape) * 0.02
    packed, state, ref = _bnb(w, double_quant)
    q = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert q.data.dtype == torch.uint8 and torch.equal(q.data, packed.reshape(-1))
    if double_quant:
        assert torch.equal(q.absmax, state.absmax)                      # the uint8 codes of absmax
        assert torch.equal(q.absmax_scale, state.state2.absmax)
        assert torch.equal(q.absmax_offset, state.offset)
    else:
        assert torch.equal(q.absmax, state.absmax)
    out = dequantize_nf4(q)
    assert out.shape == ref.shape == w.shape and out.dtype == w.dtype
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_matches_bitsandbytes_on_a_large_heavy_tailed_weight():
    w = torch.randn(512, 1000) * torch.rand(512, 1) * (10 ** torch.randn(1, 1000))
    for double_quant in (False, True):
        packed, state, ref = _bnb(w, double_quant)
        q = quantize_nf4(w, double_quant=double_quant)
        assert torch.equal(q.data, packed.reshape(-1))
        assert torch.equal(q.absmax, state.absmax)
        torch.testing.assert_close(dequantize_nf4(q), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    w = torch.randn(40, 96).to(dtype)
    packed, state, ref = _bnb(w, True)
    q = quantize_nf4(w)
    assert torch.equal(q.data, packed.reshape(-1))
    out = dequantize_nf4(q)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-6, rtol=0)


def test_packing_and_block_scaling_by_hand():
    w = torch.zeros(70)
    w[0], w[1], w[2] = 1.0, -1.0, 0.3               # block 0: absmax 1 -> codes 15, 0, nearest to 0.3
    w[64:] = -4.0                                   # the short last block: all at -absmax
    q = quantize_nf4(w, double_quant=False)
    idx = unpack_nf4(q)
    near = int((nf4_code() - 0.3).abs().argmin())
    assert idx[:3].tolist() == [15, 0, near] and (idx[3:64] == 7).all() and (idx[64:] == 0).all()
    assert q.data[0].item() == (15 << 4) | 0
    assert q.absmax.tolist() == [1.0, 4.0] and q.data.numel() == 35
    assert torch.equal(dequantize_nf4(q)[64:], w[64:])


def test_all_zero_weight_round_trips():
    w = torch.zeros(3, 64)
    for double_quant in (False, True):
        assert torch.equal(dequantize_nf4(quantize_nf4(w, double_quant=double_quant)), w)


def test_bits_per_parameter_and_error():
    w = torch.randn(1024, 1024)
    plain, double = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    assert plain.bits_per_parameter() == pytest.approx(4 + 32 / 64)                       # 4.5
    assert double.bits_per_parameter() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)  # ~4.127
    # double quantization barely changes the weights (the scales are 8-bit, relative error ~1e-2)
    err = lambda q: ((dequantize_nf4(q) - w).norm() / w.norm()).item()  # noqa: E731
    assert err(plain) < 0.11 and err(double) < err(plain) * 1.02


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError):
        quantize_nf4(torch.ones(4, dtype=torch.int64))
    with pytest.raises(UserError):
        quantize_nf4(torch.ones(4), blocksize=63)
    with pytest.raises(UserError):
        NF4Linear(quantize_nf4(torch.ones(64)))


@pytest.mark.parametrize("bias", [False, True])
def test_nf4_linear_forward_and_backward(bias):
    linear = nn.Linear(96, 40, bias=bias)
    layer = NF4Linear.from_linear(linear)
    assert isinstance(layer.qweight, NF4Tensor)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.weight_data.dtype == torch.uint8 and layer.weight_data.numel() == 40 * 96 // 2
    assert layer.weight_absmax.dtype == torch.uint8                     # double-quantized scales
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = layer(x)
    w = dequantize_nf4(quantize_nf4(linear.weight))
    expected = F.linear(x, w, linear.bias.detach() if bias else None)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w, _bnb(linear.weight.detach(), True)[2], atol=1e-6, rtol=0)
    y.square().sum().backward()
    grad = torch.autograd.grad(expected.square().sum(), x)[0]
    torch.testing.assert_close(x.grad, grad)
    assert x.grad.abs().sum() > 0


def test_nf4_linear_state_dict_round_trip():
    layer = NF4Linear.from_linear(nn.Linear(64, 16))
    other = NF4Linear.from_linear(nn.Linear(64, 16))
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(other(x), layer(x))
