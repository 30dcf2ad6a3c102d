"""AdamW written from scratch, parameter groups, and the optimizer factory.

AdamW (Loshchilov & Hutter 2019) is Adam with *decoupled* weight decay: the decay shrinks the
weights directly instead of being added to the gradient, so it is not rescaled by Adam's
per-parameter step sizes. Per parameter p with gradient g, at step t:

    p   <- p * (1 - lr * weight_decay)
    m   <- beta1 * m + (1 - beta1) * g                # first moment (momentum)
    v   <- beta2 * v + (1 - beta2) * g^2              # second moment
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The operations are the ones torch.optim.AdamW performs, in the same order, so the results are
bit-identical to it (tested). The state layout is torch's too, so checkpoints move between them.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UserError
from .config import TrainConfig


class AdamW(torch.optim.Optimizer):
    """foreach=True (the default) applies each line of the update above to all of a group's
    tensors in one call (torch._foreach_*), instead of one Python iteration and a dozen small
    kernels per parameter: the same element-wise operations in the same order, so the same bits,
    at a fraction of the overhead on models with hundreds of parameter tensors."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, foreach: bool = True) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            for param in params:
                state = self.state[param]
                if not state:
                    # A float tensor step, as in torch, so the two optimizers' states are interchangeable.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
            if self.foreach:
                # One foreach call needs tensors of one device and dtype, and the bias corrections
                # need one step count: parameters that skipped steps (no grad) count fewer.
                batches: dict[tuple, list[torch.Tensor]] = {}
                for param in params:
                    key = (param.device, param.dtype, self.state[param]["step"].item())
                    batches.setdefault(key, []).append(param)
                for (_, _, step), batch in batches.items():
                    self._update(group, batch, step)
            else:
                for param in params:
                    self._update(group, [param], self.state[param]["step"].item())
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], step: float) -> None:
        """The AdamW update of the module docstring for `params`, which share one step count."""
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        grads = [param.grad for param in params]
        exp_avgs = [self.state[param]["exp_avg"] for param in params]
        exp_avg_sqs = [self.state[param]["exp_avg_sq"] for param in params]
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step

        torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2 ** 0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bias_correction1)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of all gradients: sqrt(sum over tensors of ||g||^2), as one scalar.

    One foreach call gives each tensor's norm; the norm of those norms is the global one. Under
    FSDP the gradients are sharded DTensors, and the same two lines reduce over the shards.
    """
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / global norm), in place; returns the norm before.

    Clipping the *global* norm keeps the update's direction (every gradient shrinks by the same
    factor); the 1e-6 keeps a zero gradient finite. Equal to torch.nn.utils.clip_grad_norm_ (tested).
    """
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    total = grad_norm(grads)
    if max_norm > 0 and grads:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices decay; norms, biases and embeddings do not.

    Decaying a norm's gain or a bias only pulls it toward 0 for no regularisation benefit, and
    embedding rows of rare tokens would be shrunk on every step they are not used. A tied output
    head is the embedding matrix, so it is not decayed either.
    """
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():     # parameters() yields a shared (tied) tensor once
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embeddings:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, extras: nn.Module | None = None,
                    extras_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """`optimizer`: adamw (ours), torch (torch.optim.AdamW), fused (torch's fused AdamW kernel).

    extras: an objective's extra trainable modules (a value head), in groups of their own whose
    learning rate is `extras_lr_scale` times the schedule's (the loop reads each group's lr_scale).
    """
    groups = parameter_groups(model, config.weight_decay)
    if extras is not None:
        groups += [{**group, "lr_scale": extras_lr_scale} for group in parameter_groups(extras, config.weight_decay)]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise UserError("nothing to train: no parameter requires grad; unfreeze something or add an adapter")
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    if config.optimizer == "adamw":
        return AdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, fused=config.optimizer == "fused", **kwargs)
