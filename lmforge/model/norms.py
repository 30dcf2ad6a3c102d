"""LayerNorm and RMSNorm.

RMSNorm (Llama) drops LayerNorm's mean-centering and bias: x / rms(x) * weight. It is computed in
fp32 because the mean of squares of bf16 activations loses too much precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: a handful of tensor passes instead of the ~40 small
    ops autograd records for the composite (upcast, mean of squares, rsqrt, two products, downcast).

    Forward: r = 1 / sqrt(mean(x^2) + eps) per row, x_hat = x * r, y = x_hat * w (statistics in fp32).
    Backward, with g the upstream gradient and n = dim:
        dw = sum over rows of g * x_hat
        dx = r * (g*w - x_hat * mean(g*w * x_hat))      (the projection that keeps rms(x_hat) = 1)
    Only x (in its own dtype) and r ([rows, 1] fp32) are saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)     # fp32, or fp64 for fp64 inputs
        x32 = x.to(compute)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd * weight.to(compute)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.to(rstd.dtype) * rstd
        grad32 = grad.to(rstd.dtype)
        grad_x_hat = grad32 * weight.to(rstd.dtype)
        dot = (grad_x_hat * x_hat).mean(-1, keepdim=True)
        grad_x = rstd * (grad_x_hat - x_hat * dot)
        grad_weight = (grad32 * x_hat).reshape(-1, x.shape[-1]).sum(0)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., dim], weight: [dim] -> [..., dim] in x's dtype, normalised in fp32."""
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> [..., dim], same dtype as x."""
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2 and BERT use one; many modern models do not)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def build_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else LayerNorm(dim, eps, bias)
