"""LLM.int8() (Dettmers et al. 2022), written from scratch.

    from lmforge.quant.int8 import Int8Linear, quantize_rowwise, find_outlier_columns
    layer = Int8Linear.from_linear(linear, threshold=6.0)   # int8 weight, fp16/fp32 outlier columns
    y = layer(x)                                              # x [..., in] -> [..., out]

Vector-wise absmax quantization. A matmul Y = X W^T is a grid of dot products of a row of X (one
token) with a row of W (one output feature). Quantizing each of those vectors with its own scale,

    CW[o, :] = round(127 * W[o, :] / sw[o])        sw[o] = max_i |W[o, i]|    (weights: per row)
    CX[t, :] = round(127 * X[t, :] / sx[t])        sx[t] = max_i |X[t, i]|    (activations: per token)
    Y[t, o] ~ (CX[t] . CW[o]) * sx[t] * sw[o] / 127^2                  (an int32 dot product, rescaled)

keeps one large value from crushing every other row's resolution, which a single per-tensor scale
would do.

Mixed-precision decomposition. Past ~6.7B parameters, a handful of hidden dimensions carry
activations 20x larger than the rest, in almost every token and layer (the "emergent outlier
features"). One such value in a token's vector sets that token's absmax, so every other value of
the token is rounded to a few levels, and perplexity collapses. LLM.int8() finds the input columns
where any token has |x| >= threshold (6.0), and computes those few columns in floating point:

    Y = int8_matmul(X[:, normal], W[:, normal]) + X[:, outliers] @ W[:, outliers]^T

Both parts follow bitsandbytes' `Linear8bitLt(has_fp16_weights=False, threshold=6.0)` exactly, so
tests/test_quant_int8.py can compare the two on the same weights:
- the activation is rounded to fp16 for its statistics; the token absmax is taken with the outlier
  *values* zeroed (not their whole columns), then the outlier columns are zeroed in the int8 codes;
- the weight is only kept in int8, so the outlier part uses its dequantized columns CW * sw / 127;
- the int32 dot products are computed as an fp32 matmul of the codes (exact below 2^24, which is
  what bitsandbytes' CPU fallback does: torch._int_mm has no fast kernel on AVX2 CPUs).
The outlier set depends on the data, so this layer is not for torch.compile'd decoding; for fast
CPU decoding use weight-only int8 (weight_only.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import UserError

INV_127 = 7.874015718698502e-3          # 1/127 as bitsandbytes writes it
INV_127_SQ = 6.200124e-05               # 1/127^2


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [R, C], fp32 absmax per row [R]) of a 2-D tensor; an all-zero row gets codes 0."""
    absmax = x.abs().amax(dim=1).float()
    codes = torch.round(x * (127.0 / absmax.clamp(min=1e-30)).unsqueeze(1)).to(torch.int8)
    return codes, absmax


def dequantize_rowwise(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """fp32 values of int8 `codes` [R, C] with row scales `absmax` [R]."""
    return codes * absmax.view(-1, 1) * INV_127


def find_outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices (int64 [n]) of the columns of x [T, C] where any token has |x| >= threshold."""
    return torch.nonzero((x.abs() >= threshold).any(dim=0)).view(-1)


def quantize_activations(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 codes [T, C], per-token absmax [T] and outlier columns [n] of x [T, C]."""
    x16 = x.to(torch.float16)                      # bitsandbytes takes its statistics in fp16
    outliers = x16.abs() >= threshold if threshold > 0 else torch.zeros_like(x16, dtype=torch.bool)
    columns = torch.nonzero(outliers.any(dim=0)).view(-1)
    codes, absmax = quantize_rowwise(x16.masked_fill(outliers, 0))
    if columns.numel():
        codes[:, columns] = 0                      # those columns go through floating point instead
    return codes, absmax, columns


def int8_matmul(x: torch.Tensor, weight_codes: torch.Tensor, weight_absmax: torch.Tensor,
                threshold: float = 6.0, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() matmul: x [T, in] @ W^T with W given as int8 row codes [out, in] + absmax [out].

    Returns (y [T, out] in x.dtype, the outlier columns used [n])."""
    codes, absmax, columns = quantize_activations(x, threshold)
    acc = codes.float() @ weight_codes.float().t()               # the int32 dot products, exactly
    y = acc * (absmax.unsqueeze(1) * weight_absmax.unsqueeze(0)) * INV_127_SQ
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if columns.numel():
        w_cols = dequantize_rowwise(weight_codes[:, columns], weight_absmax).to(x.dtype)   # [out, n]
        y = y.addmm(x[:, columns], w_cols.t())
    return y, columns


class Int8Linear(nn.Module):
    """A frozen Linear in LLM.int8(): int8 row-wise weight, per-token int8 activations, outlier
    input columns (|x| >= threshold in any token) in floating point. threshold=0 turns the
    decomposition off (plain vector-wise int8, which is what breaks on outlier features).

    After each forward, `last_outliers` holds the outlier column indices it used (for the lab).
    """

    def __init__(self, weight_codes: torch.Tensor, weight_absmax: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, threshold: float = 6.0):
        super().__init__()
        if threshold < 0:
            raise UserError(f"LLM.int8 threshold must be >= 0, got {threshold}; use 6.0 (0 = no decomposition)")
        self.out_features, self.in_features = weight_codes.shape
        self.threshold = float(threshold)
        self.register_buffer("weight_codes", weight_codes)
        self.register_buffer("weight_absmax", weight_absmax)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.last_outliers: Optional[torch.Tensor] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> "Int8Linear":
        # bitsandbytes quantizes the fp16 copy of the weight; do the same so the codes agree
        codes, absmax = quantize_rowwise(linear.weight.detach().to(torch.float16))
        return cls(codes, absmax, linear.bias, threshold)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_rowwise(self.weight_codes, self.weight_absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y, self.last_outliers = int8_matmul(x.reshape(-1, self.in_features), self.weight_codes,
                                            self.weight_absmax, self.threshold, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, llm.int8, threshold={self.threshold}"
