"""`TrainContext`: what an objective may use besides its batch, handed to `setup` and `prepare`.

    def setup(self, ctx):
        self.reference = ctx.frozen["reference"]          # on ctx.device, eval mode, no grad
    def prepare(self, batch, ctx):
        with ctx.policy() as policy:                      # the live weights, eval mode, no grad
            rollouts = Engine(policy, tokenizer).generate(prompts, params)
        with ctx.autocast():
            batch["ref_logps"] = ...self.reference(...)

The policy seen through `policy()` is always the weights being trained, never the EMA copy
(evaluation uses the EMA; rollouts must come from the policy the ratio is taken against).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from .distributed import DistributedContext

if TYPE_CHECKING:
    from .loop import Trainer


@dataclass
class TrainContext:
    trainer: "Trainer" = field(repr=False)
    frozen: dict[str, nn.Module] = field(default_factory=dict)   # reference / reward / teacher models

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    @property
    def distributed(self) -> DistributedContext:
        return self.trainer.context

    @property
    def step(self) -> int:
        """Optimizer steps done so far."""
        return self.trainer.step

    @property
    def extras(self) -> nn.ModuleDict:
        """The objective's extra trainable modules, on the device (see Objective.trainable_modules)."""
        return self.trainer.extras

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.trainer.autocast()

    @contextlib.contextmanager
    def policy(self) -> Iterator[nn.Module]:
        """The trained model with its live weights, in eval mode (no dropout), no grad and autocast;
        its training mode is restored afterwards. Every process must enter it together under FSDP."""
        model = self.trainer.raw
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.autocast():
                yield model
        finally:
            model.train(was_training)


def freeze(model: nn.Module, device: torch.device) -> nn.Module:
    """A frozen model for an objective: on `device`, eval mode, no parameter requires grad."""
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def move_tensors(value: Any, device: torch.device) -> Any:
    """`value` with every tensor inside (dicts, lists, tuples) moved to device; anything else as is
    (batches may carry strings and metadata: prompts to roll out, answers to score)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: move_tensors(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_tensors(item, device) for item in value)
    return value
