"""Learning-rate schedules: linear warmup, then cosine, warmup-stable-decay, or constant.

A schedule is a pure function of (step, total_steps), so resuming needs only the step. `step` is
the number of optimizer updates already done: the first update uses `lr_at(0, total)`.
`total_steps` is max_steps, or an estimate from the wall-clock budget when the run has one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LRSchedule:
    kind: str = "cosine"            # cosine | wsd | constant
    lr: float = 1e-3                # peak learning rate
    min_lr: float = 1e-4            # where cosine and wsd end
    warmup_steps: int = 100
    decay_fraction: float = 0.2     # wsd: the last fraction of total_steps decays linearly

    def lr_at(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            # Linear warmup that reaches the peak on the last warmup step (never a zero lr).
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            decay_steps = max(1, total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / decay_steps)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        if self.kind == "wsd":
            # Warmup-stable-decay (Hu et al. 2024, MiniCPM): hold the peak, then decay at the end.
            # The stable phase can be extended by a resumed run without redoing the decay.
            decay_start = max(self.warmup_steps, total_steps - round(self.decay_fraction * total_steps))
            if step < decay_start:
                return self.lr
            progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
            return self.lr + (self.min_lr - self.lr) * progress
        raise ValueError(f"unknown schedule kind '{self.kind}'")

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)
