"""Feed-forward blocks: GELU (GPT-2, BERT), SwiGLU (Llama), ReLU^2 (Primer), and a Mixture of Experts.

Every MLP maps [..., d_model] -> [..., d_model] through a hidden width d_ff.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class MLP(nn.Module):
    """GELU (exact or tanh approximation) or ReLU^2: down(act(up(x)))."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.up(x)
        if self.activation == "relu2":
            hidden = F.relu(hidden).square()
        else:
            hidden = F.gelu(hidden, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.down(hidden)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused matmul."""

    def __init__(self, d_model: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def build_mlp(config: ModelConfig) -> nn.Module:
    if config.n_experts > 0:
        return MixtureOfExperts(config)
    return build_dense_mlp(config)


def build_dense_mlp(config: ModelConfig) -> nn.Module:
    if config.mlp == "swiglu":
        return SwiGLU(config.d_model, config.d_ff, config.mlp_bias)
    return MLP(config.d_model, config.d_ff, config.mlp, config.mlp_bias)


class MixtureOfExperts(nn.Module):
    """Top-k routed experts (Shazeer et al. 2017; Switch/Mixtral style).

    Each token goes to the k experts with the highest router probability; their outputs are mixed
    with the top-k probabilities renormalised to sum to 1. Only k of n_experts MLPs run per token,
    so parameters grow with n_experts while compute per token stays ~k dense MLPs.

    Two auxiliary losses keep routing healthy (returned by `forward` beside the output, so that
    they travel with the graph through DDP, compile and activation checkpointing):
    - load balancing (Switch Transformer): n_experts * sum_e f_e * P_e, where f_e is the fraction
      of routed token slots that went to expert e and P_e the mean router probability of e.
      It is minimised (= 1) by a uniform split.
    - router z-loss (ST-MoE): mean(logsumexp(router_logits)^2), keeps logits small and stable.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.experts_top_k
        self.aux_loss_coef, self.z_loss_coef = config.moe_aux_loss_coef, config.moe_z_loss_coef
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(build_dense_mlp(config) for _ in range(config.n_experts))

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens: [N, d] -> (weights [N, k] summing to 1, expert ids [N, k], router logits [N, E])."""
        logits = self.router(tokens).float()
        probs = logits.softmax(dim=-1)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)
        weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return weights, top_experts, logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., d] -> (output [..., d], auxiliary loss: a scalar)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])                                     # [N, d]
        weights, experts, logits = self.route(tokens)
        output = torch.zeros_like(tokens)
        for expert_index, expert in enumerate(self.experts):
            token_index, slot = (experts == expert_index).nonzero(as_tuple=True)
            if token_index.numel() == 0:
                continue
            expert_out = expert(tokens[token_index]) * weights[token_index, slot, None].to(tokens.dtype)
            output.index_add_(0, token_index, expert_out.to(output.dtype))
        return output.reshape(shape), self.auxiliary_loss(logits, experts)

    def auxiliary_loss(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        routed = F.one_hot(experts, self.n_experts).float().sum(dim=1)        # [N, E], k ones per row
        fraction_routed = routed.mean(dim=0) / self.top_k                      # f_e, sums to 1
        mean_prob = probs.mean(dim=0)                                          # P_e
        balance = self.n_experts * (fraction_routed * mean_prob).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return self.aux_loss_coef * balance + self.z_loss_coef * z_loss
