"""QLoRA (Dettmers et al. 2023): LoRA adapters on a frozen base stored in 4-bit NF4.

    from lmforge.peft.qlora import QLoRAConfig, apply_qlora, qlora_merged_state_dict
    apply_qlora(model, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    ...train: only the adapters require grad; every block linear is 4-bit...
    describe_qlora(model)        # 'NF4 base: 4.127 bits per parameter over 106M weights, ...'
    state = qlora_merged_state_dict(model)    # dequantized base + adapters: a plain model

What changes against LoRA. Every linear layer of the transformer blocks keeps its weight as NF4
(lmforge/quant/nf4.py: 16-value NormalFloat code, blockwise absmax over 64 weights, the absmax
double-quantized to 8 bits in blocks of 256, ~4.127 bits per weight) instead of fp32 (32 bits).
The embedding, the norms and the output head stay in full precision, as in QLoRA and PEFT.

Dequantize on the fly, in forward AND backward. `NF4Matmul` is a custom autograd Function:
forward dequantizes W to the input's dtype, computes x W^T and throws W away; backward
dequantizes W again for dL/dx = dL/dy W. Plain `F.linear(x, dequantize(q))` would keep the
dequantized fp32 W alive for backward in every layer, undoing the memory saving. No gradient is
computed for the 4-bit weight (it is frozen); the gradient flows to x and so to the adapters
and everything before the layer.

The dequantization here is one table look-up per byte: a [256, 2] table maps a packed byte to
its two code values, `index_select` writes them straight into the output and one in-place
multiply applies the block absmax, a chunk of 1M weights at a time (the chunk's int32 indices stay
in cache; no full-size temporary). It equals `dequantize_nf4` exactly (tested) and is what the
benchmark times against bitsandbytes' CPU kernel (0.70x its speed on one EPYC core).

Loading: `apply_qlora` quantizes a model that is already loaded in fp32; `qlora_loading.load_qlora`
builds the same model straight from a checkpoint, one layer at a time, and is what `peft=qlora` uses.

Checkpoints hold the adapters only (the 4-bit buffers are not persistent: the base is rebuilt
from `base_model` and re-quantized, which is deterministic), and the adapters are saved in
PEFT's LoRA format, so they load into peft on the unquantized base (`save_adapter`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..quant.nf4 import NF4_OFFSET, NF4Tensor, _blockwise_dequant, _dynamic_code_cached, _nf4_code_cached, quantize_nf4
from .lora import LoRAConfig, LoRALinear, apply_lora, lora_layers
from .targets import OUTPUT_HEADS, parent_of


# ----------------------------------------------------------------------------- fast dequantization


@lru_cache(maxsize=None)
def _byte_table() -> torch.Tensor:
    """[256, 2] float32: the two NF4 values a packed byte holds (high nibble first)."""
    code = _nf4_code_cached(NF4_OFFSET)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def block_scales(q: NF4Tensor) -> torch.Tensor:
    """The fp32 absmax of each block [nblocks] (decoding the double-quantized 8-bit codes)."""
    if q.absmax_scale is None:
        return q.absmax
    return _blockwise_dequant(q.absmax, q.absmax_scale, _dynamic_code_cached(), q.absmax_blocksize) + q.absmax_offset


# Weights per step of the CPU loop below: a chunk's int32 indices and fp32 values stay in the cache
# between the look-up and the scale multiply, and no full-size int32 copy of the bytes is made.
# Large enough that a [4096, 4096] weight takes 16 steps: each op is a parallel region, and on a
# busy machine every region waits for its slowest thread.
DEQUANT_CHUNK = 1 << 20


def dequantize_fast(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """= quant.nf4.dequantize_nf4(q), bit for bit, with no full-size temporary.

    A [256, 2] table maps a packed byte to its two code values: `index_select` writes them straight
    into the output, which is then multiplied in place by each block's absmax, chunk by chunk.
    Other dtypes are computed in fp32 (a chunk at a time) and cast, as dequantize_nf4 does."""
    dtype = dtype or q.dtype
    n, size, device = q.numel(), q.blocksize, q.data.device
    out = torch.empty(q.shape, dtype=dtype, device=device)
    flat, table, scales = out.view(-1), _byte_table().to(device), block_scales(q)
    whole = n // size                                         # blocks that lie entirely inside the weight
    step = max(1, DEQUANT_CHUNK // size) if device.type == "cpu" else max(1, whole)
    # int32 indices: index_select is ~2.5x faster with them than table[data.long()] on CPU.
    index = torch.empty(min(step, whole) * size // 2, dtype=torch.int32, device=device)
    staging = None if dtype == torch.float32 else torch.empty(min(step, whole) * size, device=device)
    for first in range(0, whole, step):
        last = min(whole, first + step)
        idx = index[: (last - first) * size // 2]
        idx.copy_(q.data[first * size // 2: last * size // 2])
        values = flat[first * size: last * size] if staging is None else staging[: (last - first) * size]
        torch.index_select(table, 0, idx, out=values.view(-1, 2))
        values.view(-1, size).mul_(scales[first:last, None])
        if staging is not None:
            flat[first * size: last * size].copy_(values)
    if whole * size < n:                                      # a short last block
        tail = table.index_select(0, q.data[whole * size // 2:].int()).reshape(-1)[: n - whole * size]
        flat[whole * size:].copy_(tail * scales[whole])
    return out


class NF4Matmul(torch.autograd.Function):
    """y = x W^T with W [out, in] stored in NF4, dequantized in forward and again in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "NF4Weight") -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, layer.dequantize(x.dtype))       # (autocast, if on, casts both to bf16)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = ctx.layer.dequantize(grad_out.dtype)                          # recomputed, never stored
        return (grad_out @ weight).to(ctx.x_dtype), None


class NF4Weight(nn.Module):
    """A frozen 4-bit weight [out, in] as non-persistent buffers (checkpoints leave it out)."""

    def __init__(self, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> None:
        super().__init__()
        q = quantize_nf4(weight.detach(), blocksize=blocksize, double_quant=double_quant)
        self.shape, self.blocksize, self.dtype = q.shape, blocksize, q.dtype
        self.register_buffer("data", q.data, persistent=False)
        self.register_buffer("absmax", q.absmax, persistent=False)
        self.register_buffer("absmax_scale", q.absmax_scale, persistent=False)
        self.register_buffer("absmax_offset", q.absmax_offset, persistent=False)

    @property
    def q(self) -> NF4Tensor:
        return NF4Tensor(self.data, self.absmax, self.shape, self.blocksize, self.dtype,
                         self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fast(self.q, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return NF4Matmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, nf4, blocksize={self.blocksize}, {self.q.bits_per_parameter():.3f} bits"


class NF4FrozenLinear(nn.Module):
    """A linear layer no adapter targets, its weight in NF4 (the bias, if any, frozen fp32)."""

    def __init__(self, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.nf4 = NF4Weight(linear.weight, blocksize, double_quant)
        self.register_parameter("bias", linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.nf4.matmul(x)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def dequantized_weight(self) -> torch.Tensor:
        return self.nf4.dequantize()


class QLoRALinear(LoRALinear):
    """LoRALinear whose frozen weight is NF4: `base_linear` is NF4Matmul, `base_weight` dequantizes."""

    nf4: NF4Weight

    @classmethod
    def from_lora(cls, layer: LoRALinear, blocksize: int = 64, double_quant: bool = True) -> "QLoRALinear":
        """Re-type `layer` in place: the adapters stay the same Parameters, the fp32 weight goes."""
        nf4 = NF4Weight(layer.weight, blocksize, double_quant)
        del layer.weight
        layer.__class__ = cls
        layer.nf4 = nf4
        return layer

    def base_weight(self) -> torch.Tensor:
        return self.nf4.dequantize()

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.nf4.matmul(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            raise UserError("a QLoRA layer cannot be merged into its 4-bit weight; use qlora_merged_state_dict")
        return super().forward(x)

    def merge(self) -> None:
        raise UserError("a QLoRA layer cannot be merged into its 4-bit weight; export with "
                        "qlora_merged_state_dict (dequantized base + adapters) instead")

    def unmerge(self) -> None:
        return None

    def extra_repr(self) -> str:
        return super().extra_repr() + ", nf4 base"


# ----------------------------------------------------------------------------- applying it


def check_blocksize(blocksize: int) -> None:
    if blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
        raise UserError(f"qlora blocksize must be a power of two from 64 to 4096 (bitsandbytes' sizes), "
                        f"not {blocksize}; use 64")


def quantize_base(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Replace every block linear (LoRA-wrapped or not, output heads excepted) by its NF4 form, in place."""
    check_blocksize(blocksize)
    for path, module in list(model.named_modules()):
        if path.rsplit(".", 1)[-1] in OUTPUT_HEADS:
            continue
        if type(module) is LoRALinear:
            replacement: nn.Module = QLoRALinear.from_lora(module, blocksize, double_quant)
        elif type(module) is nn.Linear:
            replacement = NF4FrozenLinear(module, blocksize, double_quant)
        else:
            continue
        parent, attribute = parent_of(model, path)
        setattr(parent, attribute, replacement)
    model.qlora_blocksize = blocksize
    return model


def apply_qlora(model: nn.Module, config: LoRAConfig | None = None, blocksize: int = 64,
                double_quant: bool = True) -> nn.Module:
    """LoRA adapters (fp32) on `model`, then its block linears quantized to NF4; returns `model`."""
    apply_lora(model, config)
    return quantize_base(model, blocksize, double_quant)


def nf4_weights(model: nn.Module) -> list[NF4Weight]:
    return [module for module in model.modules() if isinstance(module, NF4Weight)]


def bits_per_parameter(model: nn.Module) -> float:
    """Storage bits per quantized weight over all NF4 weights (~4.127 with double quantization)."""
    weights = nf4_weights(model)
    numel = sum(w.q.numel() for w in weights)
    return sum(w.q.storage_bits() for w in weights) / max(numel, 1)


def describe_qlora(model: nn.Module) -> str:
    weights = nf4_weights(model)
    numel = sum(w.q.numel() for w in weights)
    bytes_ = sum(w.q.storage_bits() for w in weights) / 8
    return (f"NF4 base: {len(weights)} linear layers, {numel / 1e6:.1f}M weights at {bits_per_parameter(model):.3f} "
            f"bits per parameter ({bytes_ / 2**20:.1f} MiB instead of {numel * 4 / 2**20:.1f} MiB in fp32)")


@torch.no_grad()
def qlora_merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's keys with every weight dequantized and the adapters folded in."""
    state = {name: tensor for name, tensor in model.state_dict().items() if ".lora." not in name}
    for path, module in model.named_modules():
        if isinstance(module, QLoRALinear):
            state[f"{path}.weight"] = module.merged_weight()
        elif isinstance(module, NF4FrozenLinear):
            state[f"{path}.weight"] = module.dequantized_weight()
    return state


def has_qlora(model: nn.Module) -> bool:
    return any(isinstance(layer, QLoRALinear) for _, layer in lora_layers(model))
