"""lmforge's int8 GEMV (lmforge.quant.int8_gemv): the product it computes, where Int8WeightLinear
uses it, inside torch.compile, and the switch back to torch's kernel.

The kernel needs a CPU with AVX-512; on others these tests skip (the layer then uses torch's kernel,
which the weight-only tests cover). On an AVX-512 CPU a failed build is a failure, not a skip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.quant import int8_gemv as gemv_module
from lmforge.quant.weight_only import Int8WeightLinear

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                       reason="lmforge's int8 GEMV needs a CPU with AVX-512; torch's kernel serves this one"),
]


def _layer(in_features: int, out_features: int, seed: int = 0) -> Int8WeightLinear:
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.05)
    return Int8WeightLinear.from_linear(linear)


def test_the_kernel_builds_on_an_avx512_cpu():
    assert gemv_module.int8_gemv_available()


@pytest.mark.parametrize("rows,in_features,out_features", [(1, 576, 1536), (3, 1536, 576), (4, 100, 37), (2, 64, 1)])
def test_the_kernel_is_the_int8_product_in_fp32(rows, in_features, out_features):
    generator = torch.Generator().manual_seed(rows)
    codes = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = torch.rand(out_features, generator=generator) / 100
    x = torch.randn(rows, in_features, generator=generator)
    expected = (x.double() @ codes.double().T) * scale.double()
    result = torch.ops.lmforge.int8_gemv(x, codes, scale)
    assert result.dtype == torch.float32 and result.shape == (rows, out_features)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_layer_uses_it_up_to_four_rows_and_torch_beyond():
    layer = _layer(576, 960)
    assert layer.gemv
    weight = layer.dequantized_weight()
    for x in (torch.randn(1, 576), torch.randn(2, 2, 576)):   # 1 and 4 rows: lmforge's kernel, fp32 throughout
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(8, 576)                               # torch's kernel rounds x to bf16
    error = (layer(x) - F.linear(x, weight, layer.bias)).abs().max().item()
    assert 0 < error < 0.05
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and layer(x[:1].bfloat16()).dtype == torch.bfloat16


def test_it_runs_inside_a_compiled_graph():
    layer = _layer(576, 576)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(1, 576)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_lmforge_int8_kernel_torch_keeps_torchs_kernel(monkeypatch):
    monkeypatch.setenv("LMFORGE_INT8_KERNEL", "torch")
    gemv_module._extension.cache_clear()
    try:
        assert not gemv_module.int8_gemv_available() and not _layer(64, 32).gemv
    finally:
        monkeypatch.delenv("LMFORGE_INT8_KERNEL")
        gemv_module._extension.cache_clear()
    assert gemv_module.int8_gemv_available()
