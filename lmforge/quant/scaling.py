"""Activation-aware channel scaling (AWQ, Lin et al. 2023), folded into the operation before each Linear.

    moments = input_importance(model, ids, second_moment=True)     # E[x x^T] per Linear (calibrate.py)
    importance = fold_input_scales(model, moments, fake_quant)     # then quantize with `importance`

A Linear computes W x = (W diag(s)) (x / s) for any positive s [in_features]. Scaling a column of W
up by s_j before rounding makes that column's rounding error relatively smaller, and dividing its
input by s_j scales the error's effect on the output back down: columns that meet large inputs
(large E[x_j^2]) gain most. AWQ picks s = E[x^2]^(alpha/2) per layer, with alpha searched on a
grid for the smallest output error after quantization. That error is measured on the calibration
inputs themselves: with E = Q(W diag(s)) - W diag(s) and the inputs' second moment M = E[x x^T],
the mean squared output error is tr(E diag(1/s) M diag(1/s) E^T). Scoring it by the diagonal of M
alone picked alphas that moved perplexity by several points either way (docs/LOG.md).

The 1/s must be applied to the input somewhere. Done at run time it is a multiply per Linear;
here it is folded into the operation that produces the input, so the quantized model runs exactly
as fast as before and its files keep their format:

    qkv, gate_up (SwiGLU) or up (GELU)  input = norm(x) * w      -> the pre-norm's weight (and bias) / s
    out                                 input = attention over v -> v's rows (and bias) / s
    down (SwiGLU)                       input = silu(gate) * up  -> up's rows (and bias) / s

The out projection's inputs from query heads that share one key/value head (GQA) come from the
same v rows, so their scales are tied (averaged over the group). The folding itself changes no
output (tested); only the quantization that follows sees different weights. The importance each
quantized layer then weighs its rounding by is E[(x/s)^2] = E[x^2] / s^2, which is what this returns.

On SmolLM2-135M (docs/LOG.md), on top of the importance-weighted NF4 block search, held-out
perplexity on 4096 tokens: +12.2% -> +8.8% as stored (double-quantized scales; +7.9% without
double quantization). Only NF4 folds (see quantize.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]              # SmolLM2 picks 0, 0.25 and (rarely) 0.5
FakeQuant = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (weight [out, in], importance [in]) -> dequantized


def _base(module: nn.Module) -> nn.Linear:
    """The plain Linear under a several-adapter layer (lmforge/peft/multi_lora.py), or the layer."""
    return getattr(module, "base", module)


def _scale_inputs(module: nn.Module, scale: torch.Tensor) -> None:
    """W <- W diag(s) (and the adapters' A with it, so their input stays what it was)."""
    _base(module).weight.mul_(scale.to(_base(module).weight.dtype))
    if hasattr(module, "A_all"):
        module.A_all.mul_(scale.to(module.A_all.dtype))


def _scale_rows(module: nn.Module, rows: slice, factor: torch.Tensor) -> None:
    """Output rows (weight, bias, adapters' B) times `factor`."""
    base = _base(module)
    base.weight[rows] *= factor.to(base.weight.dtype)[:, None]
    if base.bias is not None:
        base.bias[rows] *= factor.to(base.bias.dtype)
    if hasattr(module, "B_all"):
        module.B_all[rows] *= factor.to(module.B_all.dtype)[:, None]


def output_error(weight: torch.Tensor, moment: torch.Tensor, fake_quant: FakeQuant) -> float:
    """Mean squared output error of quantizing `weight` [out, in] for inputs with E[x x^T] = `moment`:
    tr(E M E^T), E = fake_quant(W) - W (the rounding weighted by the diagonal of M)."""
    error = fake_quant(weight, torch.diagonal(moment).clamp(min=0)) - weight
    return float(((error @ moment) * error).sum())


def best_scale(weight: torch.Tensor, moment: torch.Tensor, fake_quant: FakeQuant,
               tie: Callable[[torch.Tensor], torch.Tensor] | None = None, alphas: list[float] = ALPHAS
               ) -> tuple[torch.Tensor, float]:
    """(s [in], alpha) with the smallest output error of the quantized W diag(s) on inputs x / s.
    alpha = 0 (s = 1: no scaling) is a candidate, so it is never worse than not folding."""
    weight, moment = weight.detach().float(), moment.float()
    mean_square = torch.diagonal(moment).clamp(min=1e-12)
    best = (output_error(weight, moment, fake_quant), torch.ones_like(mean_square), 0.0)
    for alpha in alphas:
        if alpha == 0:
            continue
        scale = mean_square ** (alpha / 2)
        scale = tie(scale) if tie is not None else scale
        scale = scale / (scale.max() * scale.min()).sqrt()        # centred: neither grows nor shrinks W overall
        error = output_error(weight * scale[None], moment / (scale[:, None] * scale[None]), fake_quant)
        if error < best[0]:
            best = (error, scale, alpha)
    return best[1], best[2]


def _fold(moments: dict[str, torch.Tensor], name: str, consumer: nn.Module, scale: torch.Tensor) -> None:
    _scale_inputs(consumer, scale)
    moments[name] = moments[name] / (scale[:, None] * scale[None])


@torch.no_grad()
def fold_input_scales(model: nn.Module, moments: dict[str, torch.Tensor], fake_quant: FakeQuant,
                      alphas: list[float] = ALPHAS) -> dict[str, torch.Tensor]:
    """Fold an AWQ scale into every pre-norm block's Linears (see the module docstring), in place.

    `moments`: {nn.Linear name: E[x x^T] [in, in]} from `calibrate.input_importance(...,
    second_moment=True)`. Returns {name: E[x^2] [in]} of the (scaled) inputs, the importance the
    block search quantizes with. Blocks that are not pre-norm, and MoE MLPs, are left unscaled.
    """
    names = {module: name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    moments = dict(moments)         # updated as layers are folded; their diagonals are returned
    config = model.config
    for block in getattr(getattr(model, "transformer", None), "blocks", []):
        if not getattr(block, "pre_norm", False):
            continue
        attn, mlp = block.attn, block.mlp
        # out <- v rows (do the row folds first: they change the weights the norm folds then score)
        out_name = names.get(_base(attn.out))
        if out_name in moments:
            heads, kv_heads, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
            group = heads // kv_heads

            def tie(scale: torch.Tensor) -> torch.Tensor:
                return scale.view(kv_heads, group, head_dim).mean(1, keepdim=True).expand(
                    kv_heads, group, head_dim).reshape(-1)

            scale, _ = best_scale(_base(attn.out).weight, moments[out_name], fake_quant, tie, alphas)
            v_start = (heads + kv_heads) * head_dim
            _scale_rows(attn.qkv, slice(v_start, None), 1 / scale.view(kv_heads, group, head_dim)[:, 0].reshape(-1))
            _fold(moments, out_name, attn.out, scale)
        gated = hasattr(mlp, "gate_up")
        down_name = names.get(_base(getattr(mlp, "down", None))) if gated else None
        if down_name in moments:                       # down <- up's rows (linear in up: SwiGLU only)
            scale, _ = best_scale(_base(mlp.down).weight, moments[down_name], fake_quant, alphas=alphas)
            _scale_rows(mlp.gate_up, slice(config.d_ff, None), 1 / scale)
            _fold(moments, down_name, mlp.down, scale)
        for norm, consumer in ((block.attn_norm, attn.qkv), (block.mlp_norm, getattr(mlp, "gate_up", None)
                                                             or getattr(mlp, "up", None))):
            name = names.get(_base(consumer)) if consumer is not None else None
            if name not in moments:
                continue
            scale, _ = best_scale(_base(consumer).weight, moments[name], fake_quant, alphas=alphas)
            norm.weight.div_(scale.to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(scale.to(norm.bias.dtype))
            _fold(moments, name, consumer, scale)
    return {name: torch.diagonal(moment).clone() for name, moment in moments.items()}
