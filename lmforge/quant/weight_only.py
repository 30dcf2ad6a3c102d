"""Weight-only int8 and 4-bit linear layers for fast CPU decoding.

    from lmforge.quant.weight_only import Int8WeightLinear, Q4Linear
    layer = Int8WeightLinear.from_linear(linear)        # int8 per output channel (1 byte/weight)
    layer = Q4Linear.from_linear(linear)                # llama.cpp Q4_0: 4 bits + a scale per 32
    layer = Q4Linear.from_linear_q4_1(linear)           # llama.cpp Q4_1: 4 bits + scale and min per 32

Why weight-only. Decoding one token at batch 1 multiplies a vector by every weight matrix once:
each weight is read from memory for one multiply-add, so the speed is set by how many bytes of
weights stream in per token (fp32: 4 bytes/weight; SmolLM2-135M reads ~540 MB per token). Keeping
the weights in 8 or 4 bits and the activations in floating point cuts those bytes 4x or ~7x; the
arithmetic is unchanged, so unlike LLM.int8() nothing about the activations needs quantizing.

Formats (W [out, in], one scale per output row for int8, per block of 32 inputs for 4-bit):
- int8 per channel:  q = round(127 W / absmax_row),             W ~ q * absmax_row / 127
- Q4_0 (llama.cpp):  d = m / -8, m = the block value of largest |.| (with its sign),
                     q = clamp(trunc(W / d + 8.5), 0, 15),      W ~ (q - 8) * d
  using the signed extreme makes it exact (q = 0 -> -8 d = m), so the 16th level is not wasted.
- Q4_1 (llama.cpp):  d = (max - min) / 15, q = clamp(trunc((W - min) / d + 0.5), 0, 15), W ~ q d + min

Two paths compute the same thing. The readable one (`fast=False`, and any non-CPU device)
dequantizes the weight and calls F.linear. The fast one calls torch's CPU kernels for
weight-only quantized matmul, which read the packed weights directly:
`aten._weight_int8pack_mm(x, q_int8 [out, in], scales [out])` and
`aten._weight_int4pack_mm_for_cpu(x, packed, groupsize, scales_and_zeros [in/g, out, 2])`,
whose 4-bit weight is (q - 8) * scale + zero, i.e. Q4_0 with zero = 0 (and GGUF's Q4_1,
d * q + m, with zero = m + 8 d). On AVX2-only CPUs these kernels are only vectorized for bf16
activations (fp32 ones take a scalar path ~10x slower than an fp32 matmul), so the fast path
rounds x to bf16 and the result back. tests/test_quant_weight_only.py checks both paths against
the dequantized weight. For int8 at up to 4 rows (batch-1 decode) on AVX-512 CPUs, the fast path
is lmforge's own GEMV instead (int8_gemv.py: fp32 activations, weights streamed ~2x faster than
torch's int8 kernel manages on Intel Xeons).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .int8_gemv import MAX_ROWS as GEMV_ROWS
from .int8_gemv import int8_gemv_available

Q4_GROUP = 32
KERNEL_DTYPE = torch.bfloat16          # the activation dtype torch's CPU kernels are fast for


def has_int8_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def has_int4_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _check_weight(weight: torch.Tensor, group: int = 1) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise UserError(f"weight-only quantization needs a 2-D float weight [out, in], got "
                        f"{tuple(weight.shape)} {weight.dtype}; quantize an nn.Linear weight")
    if weight.shape[1] % group:
        raise UserError(f"a weight with {weight.shape[1]} input features cannot be cut into blocks of {group}; "
                        f"4-bit quantization needs in_features divisible by {group} (use int8 for this layer)")


# -- int8 per output channel ---------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [out, in], fp32 scale per row [out]) with weight ~ codes * scale[:, None]."""
    _check_weight(weight)
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    codes = torch.round(w / scale.clamp(min=1e-30).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.unsqueeze(1)


# -- Q4_0 ----------------------------------------------------------------------------------------

def quantize_q4_0(weight: torch.Tensor, group: int = Q4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(4-bit codes 0..15 as uint8 [out, in], fp32 scale per block [out, in/group]), llama.cpp's Q4_0."""
    _check_weight(weight, group)
    out_features, in_features = weight.shape
    blocks = weight.detach().float().view(out_features, in_features // group, group)
    extreme = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True)).squeeze(2)   # signed max |.|
    d = extreme / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = torch.trunc(blocks * inv.unsqueeze(2) + 8.5).clamp(0, 15).to(torch.uint8)
    return codes.view(out_features, in_features), d


def quantize_q4_1(weight: torch.Tensor, group: int = Q4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes 0..15 uint8 [out, in], scale d, min m [out, in/group]), llama.cpp's Q4_1: W ~ q * d + m.

    Asymmetric, so a block's min and max are both exact. Weights that were Q4_1 already (the
    bundled SmolLM2 GGUF) come back with the same codes: re-quantizing them loses nothing."""
    _check_weight(weight, group)
    out_features, in_features = weight.shape
    blocks = weight.detach().float().view(out_features, in_features // group, group)
    low, high = blocks.amin(dim=2), blocks.amax(dim=2)
    d = (high - low) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = torch.trunc((blocks - low.unsqueeze(2)) * inv.unsqueeze(2) + 0.5).clamp(0, 15).to(torch.uint8)
    return codes.view(out_features, in_features), d, low


def dequantize_q4(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W [out, in] = (codes - 8) * scale (+ zero) per block; scales/zeros [out, in/group]."""
    out_features, in_features = codes.shape
    group = in_features // scales.shape[1]
    w = (codes.view(out_features, -1, group).float() - 8) * scales.unsqueeze(2)
    if zeros is not None:
        w = w + zeros.unsqueeze(2)
    return w.view(out_features, in_features)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] codes 0..15 -> uint8 [out, in/2], the even column in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=2).view(packed.shape[0], -1)


# -- layers --------------------------------------------------------------------------------------

class Int8WeightLinear(nn.Module):
    """A frozen Linear with int8 weights (one scale per output channel) and float activations."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 fast: bool = True):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.fast = fast and has_int8_kernel()
        # batch-1 decode on AVX-512 CPUs: lmforge's own GEMV, which streams the weights ~2x faster
        self.gemv = self.fast and codes.device.type == "cpu" and int8_gemv_available()
        self.register_buffer("weight_int8", codes.contiguous())
        self.register_buffer("scale", scale.float())
        self.register_buffer("scale_kernel", scale.to(KERNEL_DTYPE), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # a saved quantized model (lmforge.model.loading) loads into a layer built with other values
        self.register_load_state_dict_post_hook(lambda module, _keys: module.pack_for_kernel())

    def pack_for_kernel(self) -> None:
        """(Re)build the fast path's bf16 copy of the scales."""
        self.scale_kernel = self.scale.to(KERNEL_DTYPE)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast: bool = True) -> "Int8WeightLinear":
        codes, scale = quantize_int8(linear.weight)
        return cls(codes, scale, linear.bias, fast)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x.dtype."""
        if self.fast and x.device.type == "cpu":
            x2 = x.reshape(-1, self.in_features)
            if self.gemv and x2.shape[0] <= GEMV_ROWS:
                y = torch.ops.lmforge.int8_gemv(x2.float(), self.weight_int8, self.scale)
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self.weight_int8, self.scale_kernel)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only, "
                f"fast={self.fast}, gemv={self.gemv}")


class Q4Linear(nn.Module):
    """A frozen Linear with 4-bit weights, W = (q - 8) * scale + zero per block of `group` inputs.

    weight_q4: uint8 [out, in/2] (two codes a byte), scales, zeros: fp32 [out, in/group]. The fast
    path keeps torch's own packing of the same codes (`weight_kernel`, built once at load time:
    its layout is CPU-specific, so it is not saved in the state dict).
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, fast: bool = True):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = self.in_features // scales.shape[1]
        if self.group not in (32, 64, 128, 256) and fast:
            fast = False                    # torch's kernel takes these group sizes only
        self.fast = fast and has_int4_kernel()
        zeros = torch.zeros_like(scales) if zeros is None else zeros
        self.register_buffer("weight_q4", pack_nibbles(codes))
        self.register_buffer("scales", scales.float())
        self.register_buffer("zeros", zeros.float())
        self.pack_for_kernel()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # a saved quantized model (lmforge.model.loading) loads into a layer built with other values
        self.register_load_state_dict_post_hook(lambda module, _keys: module.pack_for_kernel())

    def pack_for_kernel(self) -> None:
        """(Re)build the fast path's copy of the codes and scales from weight_q4, scales, zeros."""
        if not self.fast:
            return
        codes = unpack_nibbles(self.weight_q4).to(torch.int32).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        scales_and_zeros = torch.stack([self.scales.t(), self.zeros.t()], dim=2).contiguous()   # [in/g, out, 2]
        self.register_buffer("weight_kernel", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(KERNEL_DTYPE), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = Q4_GROUP, fast: bool = True) -> "Q4Linear":
        codes, d = quantize_q4_0(linear.weight, group)
        return cls(codes, d, None, linear.bias, fast)

    @classmethod
    def from_linear_q4_1(cls, linear: nn.Linear, group: int = Q4_GROUP, fast: bool = True) -> "Q4Linear":
        codes, d, low = quantize_q4_1(linear.weight, group)
        return cls(codes, d, low + 8 * d, linear.bias, fast)     # q * d + m = (q - 8) * d + (m + 8 d)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_q4(unpack_nibbles(self.weight_q4), self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x.dtype."""
        if self.fast and x.device.type == "cpu":
            x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_kernel, self.group, self.scales_and_zeros)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 4-bit, "
                f"group={self.group}, fast={self.fast}")
