"""An exponential moving average (EMA) of the weights.

After each optimizer step: ema <- d * ema + (1 - d) * weights. Averaging the last few hundred
steps' weights smooths out optimizer noise, and often evaluates better than the raw weights.
The decay warms up as d_t = min(decay, (1 + t) / (10 + t)) (t = updates so far), so a short
run's EMA is not dominated by the random initial weights.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        # Named like the model's parameters, so the EMA saves and loads as a state dict. Only the
        # trained ones: a frozen base (LoRA) never changes, and copying it would double its memory.
        self.shadow = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach(), weight)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Swap the EMA weights into `model` for the duration of the block (e.g. evaluation)."""
        params = {name: param for name, param in model.named_parameters() if name in self.shadow}
        backup = {name: param.detach().clone() for name, param in params.items()}
        for name, param in params.items():
            param.copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, param in params.items():
                param.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"the EMA state lacks {sorted(missing)[:3]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name])
        self.updates = updates
