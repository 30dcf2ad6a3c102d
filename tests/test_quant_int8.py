"""LLM.int8() from scratch (lmforge.quant.int8) against bitsandbytes' Linear8bitLt on the same
weights: the int8 weight codes and scales, the outlier columns, and the outputs."""
from __future__ import annotations

import bitsandbytes as bnb   # the `test` extra pins it: the reference these tests check against
import pytest
import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.quant import Int8Linear
from lmforge.quant.int8 import dequantize_rowwise, quantize_activations, quantize_rowwise

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(in_features: int, out_features: int, bias: bool, threshold: float = 6.0):
    linear = nn.Linear(in_features, out_features, bias=bias)
    ref = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=threshold)
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu").eval()                   # .to() quantizes the weight; eval = the inference path
    return linear, ref, Int8Linear.from_linear(linear, threshold=threshold)


def _with_outliers(tokens: int, features: int) -> torch.Tensor:
    x = torch.randn(tokens, features)
    x[:, 3] *= 20                                 # a systematic outlier feature, in every token
    x[tokens // 2, 11] = -9.0                     # and a single outlier value
    return x


@pytest.mark.parametrize("shape,bias", [((64, 48), True), ((100, 30), False), ((576, 192), True)])
@pytest.mark.parametrize("tokens", [1, 7])
def test_matches_bitsandbytes_linear8bitlt(shape, bias, tokens):
    linear, ref, ours = _pair(*shape, bias=bias)
    assert torch.equal(ours.weight_codes, ref.weight.CB)
    assert torch.equal(ours.weight_absmax, ref.weight.SCB)
    x = _with_outliers(tokens, shape[0])
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.last_outliers, ref.state.idx)
    assert 3 in ours.last_outliers.tolist() and (tokens < 2 or 11 in ours.last_outliers.tolist())


def test_three_dimensional_input_and_no_decomposition_match_too():
    linear, ref, ours = _pair(64, 32, bias=True, threshold=0.0)
    x = _with_outliers(10, 64).view(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert ours.last_outliers.numel() == 0


def test_decomposition_is_what_keeps_outlier_features_accurate():
    torch.manual_seed(1)
    linear = nn.Linear(256, 128, bias=False)
    x = torch.randn(16, 256)
    x[:, [5, 77]] *= 60                           # outlier features dominate each token's absmax
    exact = linear(x).detach()
    errors = {}
    for threshold in (6.0, 0.0):
        with torch.no_grad():
            y = Int8Linear.from_linear(linear, threshold=threshold)(x)
        errors[threshold] = ((y - exact).norm() / exact.norm()).item()
    assert errors[6.0] < 0.01 < errors[0.0]
    assert errors[0.0] > 5 * errors[6.0]


def test_rowwise_codes_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-4.0, 2.0, 1.0]])
    codes, absmax = quantize_rowwise(w)
    assert codes.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 32]]
    assert absmax.tolist() == [1.0, 0.0, 4.0]
    assert torch.allclose(dequantize_rowwise(codes, absmax), w, atol=4 / 127 / 2 + 1e-6)
    x = torch.tensor([[0.5, 8.0, -1.0], [1.0, 0.1, 0.2]])
    codes, absmax, columns = quantize_activations(x, 6.0)
    assert columns.tolist() == [1] and (codes[:, 1] == 0).all()
    assert absmax.tolist() == [1.0, 1.0]           # the outlier value does not set the token's scale


def test_negative_threshold_is_a_user_error():
    with pytest.raises(UserError, match="threshold"):
        Int8Linear.from_linear(nn.Linear(8, 8), threshold=-1.0)
