"""NF4, QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), written from scratch.

    from lmforge.quant import quantize_nf4, dequantize_nf4, NF4Linear
    q = quantize_nf4(weight)                    # blocks of 64, absmax double-quantized to 8 bits
    w = dequantize_nf4(q)                       # back to weight.dtype (an approximation of weight)
    q.bits_per_parameter()                      # ~4.127: 4 + 8/64 + 32/(64*256)
    layer = NF4Linear.from_linear(linear)       # frozen 4-bit weight, dequantized in every forward

The code book. NF4 is not a float format: a 4-bit index picks one of 16 fixed values, the
quantiles of a standard normal N(0, 1) rescaled to [-1, 1], so that each value covers about the
same probability mass of normally distributed weights. It is asymmetric so that 0 is exact:
8 positive quantiles of the upper half, 7 negative ones of the lower half, and 0,

    pos_i = ppf(linspace(offset, 0.5, 9)[i]), i < 8      neg_i = -ppf(linspace(offset, 0.5, 8)[i]), i < 7
    code  = sort(pos + [0] + neg) / max                   offset = 0.9677083 (ppf(offset) ~ 1.85 sigma)

exactly as bitsandbytes' `create_normal_map` builds it (float32 quantile points, float64 ppf,
float32 result); torch.special.ndtri is the normal ppf, so no scipy is needed.

Blockwise absmax quantization. The flattened weight is cut into blocks of `blocksize` (64)
values, the last one possibly shorter; each block is scaled by its absmax into [-1, 1] and each
value becomes the index of its nearest code value (ties at a midpoint go to the lower code, as in
bitsandbytes' torch.bucketize). Two indices share a byte, the first in the high nibble:
byte k = idx[2k] << 4 | idx[2k+1]; an odd count is padded with the index of 0.0 (7), as
bitsandbytes pads the scaled values with 0.0.

Double quantization (QLoRA section 3). The fp32 absmax (32 bits per 64 weights = 0.5 bit per
parameter) is itself quantized: its mean is subtracted, then it is quantized blockwise (blocks of
256) to 8 bits with bitsandbytes' signed "dynamic" 8-bit map (a dynamic exponent, Dettmers 2015),
each block keeping an fp32 absmax of its own. The 8-bit index is looked up the way bitsandbytes'
CPU kernel does it (the value rounded to a 16-bit grid, then the code nearest that grid point),
so that the stored bytes are bitsandbytes' bytes. That costs 8/64 + 32/(64*256) bits per parameter
instead of 32/64. Dequantization undoes it: absmax = code8[q] * absmax2[block] + mean.

Dequantization is code[idx] * absmax[block] in fp32, cast to the stored dtype at the end, which
is what bitsandbytes' `dequantize_4bit` computes; tests/test_quant_nf4.py checks bytes, scales and
values against bitsandbytes' CPU backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

NF4_OFFSET = 0.9677083
DOUBLE_QUANT_BLOCKSIZE = 256


# -- code books ---------------------------------------------------------------------------------

def _ppf(p: torch.Tensor) -> torch.Tensor:
    """Standard normal quantile function (inverse CDF), in float64."""
    return torch.special.ndtri(p.double())


@lru_cache(maxsize=None)
def _nf4_code_cached(offset: float) -> torch.Tensor:
    pos = _ppf(torch.linspace(offset, 0.5, 9)[:-1])        # 8 positive values (float32 points)
    neg = -_ppf(torch.linspace(offset, 0.5, 8)[:-1])       # 7 negative values
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float()
    values = values.sort().values
    return values / values.max()


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values, ascending, in [-1, 1] (a float32 tensor; index 7 is exactly 0)."""
    return _nf4_code_cached(float(offset)).clone()


@lru_cache(maxsize=None)
def _dynamic_code_cached() -> torch.Tensor:
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for
    # exponent i = 0..6 (scale 10^(i-6)), 2^i linear fractions in [0.1, 1] (bin means), both signs.
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """The 256-value signed dynamic 8-bit map double quantization uses (float32, ascending)."""
    return _dynamic_code_cached().clone()


# -- blockwise absmax quantization, any sorted code book ----------------------------------------

def _blockwise_absmax(flat: torch.Tensor, blocksize: int,
                      scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block [nblocks], values scaled into [-1, 1] [n]) of a flat float32 tensor.
    `scale` [nblocks] replaces the absmax (values beyond it clamp to +-1)."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = F.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1) if scale is None else scale.float().reshape(nblocks)
    # multiply by the reciprocal (as bitsandbytes does); an all-zero block scales to zeros
    scaled = padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    return absmax, scaled.clamp(-1, 1).reshape(-1)[:n]


def _nearest_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the ascending `code`; a tie at a midpoint goes to the lower."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints.to(scaled.device))


@lru_cache(maxsize=None)
def _dynamic_lut() -> torch.Tensor:
    grid = torch.arange(65536, dtype=torch.float32) / 65535 * 2 - 1
    return _nearest_index(grid, _dynamic_code_cached())


def _dynamic_index(scaled: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """8-bit dynamic-map indices the way bitsandbytes' CPU kernel finds them: the scaled value is
    rounded to a 16-bit grid over [-1, 1], and a 65536-entry table gives the code nearest to each
    grid point. This differs from the exact nearest code only within ~1.5e-5 of a midpoint, and an
    all-zero block gets index 0 (whose value times absmax 0 is 0 again)."""
    j = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
    idx = _dynamic_lut().to(scaled.device)[j]
    zero = (absmax == 0).repeat_interleave(blocksize)[: idx.numel()]
    return torch.where(zero, torch.zeros_like(idx), idx).to(torch.uint8)


def _blockwise_dequant(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                       blocksize: int) -> torch.Tensor:
    n = idx.numel()
    nblocks = absmax.numel()
    values = F.pad(code.to(absmax.device)[idx.long()], (0, nblocks * blocksize - n))
    return (values.view(nblocks, blocksize) * absmax.unsqueeze(1)).reshape(-1)[:n]


# -- NF4 -----------------------------------------------------------------------------------------

@dataclass
class NF4Tensor:
    """A weight quantized to NF4.

    data:     uint8 [ceil(numel / 2)], two 4-bit code indices per byte (first one in the high nibble)
    absmax:   float32 [nblocks] block scales, or, when double-quantized, their uint8 8-bit codes
    shape, dtype: of the original weight (dequantize_nf4 returns that dtype)
    blocksize: weights per absmax (64)
    absmax_scale:  float32 [ceil(nblocks / 256)]: the absmax of each block of absmax (double quant)
    absmax_offset: float32 scalar: the mean subtracted from absmax before quantizing it
    """

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    blocksize: int = 64
    dtype: torch.dtype = torch.float32
    absmax_scale: Optional[torch.Tensor] = None
    absmax_offset: Optional[torch.Tensor] = None
    absmax_blocksize: int = DOUBLE_QUANT_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 scale of each block (decoded from 8 bits when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        scales = _blockwise_dequant(self.absmax, self.absmax_scale, _dynamic_code_cached(),
                                    self.absmax_blocksize)
        return scales + self.absmax_offset

    def storage_bits(self) -> int:
        """Bits this tensor stores: packed indices + scales (+ double-quant scales and offset)."""
        bits = self.data.numel() * 8
        if self.double_quant:
            bits += self.absmax.numel() * 8 + self.absmax_scale.numel() * 32 + 32
        else:
            bits += self.absmax.numel() * 32
        return bits

    def bits_per_parameter(self) -> float:
        return self.storage_bits() / self.numel()

    def to(self, device) -> "NF4Tensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Tensor(move(self.data), move(self.absmax), self.shape, self.blocksize, self.dtype,
                         move(self.absmax_scale), move(self.absmax_offset), self.absmax_blocksize)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 scale: Optional[torch.Tensor] = None) -> NF4Tensor:
    """Quantize `weight` (float32/16, bfloat16; any shape) to NF4 with one absmax per `blocksize`.

    `scale` [nblocks]: per-block scales to store instead of the absmax (`calibrate.nf4_block_scales`
    picks them from activations); the format is unchanged, so bitsandbytes still reads it."""
    if not weight.is_floating_point():
        raise UserError(f"quantize_nf4 needs a floating-point weight, got {weight.dtype}; "
                        "pass the float weight")
    if blocksize <= 0 or blocksize % 2:
        raise UserError(f"blocksize must be a positive even number, got {blocksize}; use 64")
    if weight.numel() == 0:
        raise UserError("quantize_nf4 got an empty weight; pass a weight with at least one value")
    flat = weight.detach().reshape(-1).float()
    if scale is not None and scale.numel() != -(-flat.numel() // blocksize):
        raise UserError(f"scale has {scale.numel()} values for {-(-flat.numel() // blocksize)} blocks of {blocksize}")
    absmax, scaled = _blockwise_absmax(flat, blocksize, scale)
    idx = _nearest_index(scaled, _nf4_code_cached(NF4_OFFSET).to(flat.device))
    if idx.numel() % 2:
        idx = F.pad(idx, (0, 1), value=7)   # the padding nibble is code 0 (index 7): scaled 0.0
    idx = idx.to(torch.uint8)
    data = (idx[0::2] << 4) | idx[1::2]
    q = NF4Tensor(data, absmax, weight.shape, blocksize, weight.dtype)
    if double_quant:
        offset = absmax.mean()
        scale2, scaled2 = _blockwise_absmax(absmax - offset, DOUBLE_QUANT_BLOCKSIZE)
        q.absmax = _dynamic_index(scaled2, scale2, DOUBLE_QUANT_BLOCKSIZE)
        q.absmax_scale, q.absmax_offset = scale2, offset
    return q


def unpack_nf4(q: NF4Tensor) -> torch.Tensor:
    """The 4-bit code indices [numel] (uint8, 0..15) of a packed NF4Tensor."""
    idx = torch.stack([q.data >> 4, q.data & 0xF], dim=1).reshape(-1)
    return idx[: q.numel()]


def dequantize_nf4(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight q approximates, in `dtype` (default: the quantized weight's dtype)."""
    code = _nf4_code_cached(NF4_OFFSET)
    out = _blockwise_dequant(unpack_nf4(q), q.block_absmax(), code, q.blocksize)
    return out.reshape(q.shape).to(dtype or q.dtype)


class NF4Linear(nn.Module):
    """A Linear whose frozen weight is stored in NF4 and dequantized on the fly in every forward.

    Autograd flows through F.linear to the input (and to anything stacked on top, e.g. LoRA),
    never to the 4-bit weight, which is a set of buffers. The bias stays in full precision, frozen.
    """

    def __init__(self, q: NF4Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if len(q.shape) != 2:
            raise UserError(f"NF4Linear needs a 2-D weight [out, in], got shape {tuple(q.shape)}; "
                            "quantize a Linear weight")
        self.out_features, self.in_features = q.shape
        self.blocksize, self.weight_dtype = q.blocksize, q.dtype
        self.register_buffer("weight_data", q.data)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_absmax_scale", q.absmax_scale)
        self.register_buffer("weight_absmax_offset", q.absmax_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    scale: Optional[torch.Tensor] = None) -> "NF4Linear":
        q = quantize_nf4(linear.weight, blocksize=blocksize, double_quant=double_quant, scale=scale)
        return cls(q, linear.bias)

    @property
    def qweight(self) -> NF4Tensor:
        return NF4Tensor(self.weight_data, self.weight_absmax, torch.Size((self.out_features, self.in_features)),
                         self.blocksize, self.weight_dtype, self.weight_absmax_scale, self.weight_absmax_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_nf4(self.qweight, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
                f"blocksize={self.blocksize}, double_quant={self.weight_absmax_scale is not None}")
