"""Objectives: what to optimise, separate from how the loop optimises it.

An objective turns a batch into a loss plus metrics. The training loop never looks inside: SFT,
reward models, DPO, PPO and GRPO plug in as new objectives, not as new loops.

Losses are *sums* over the batch's units (predicted tokens here; pairs for DPO), and
`units(batch)` counts them without a forward pass. The loop divides by the number of units in the
whole optimizer step (every micro-batch, every process), so the gradient is the mean over all
units however they were split into micro-batches and padding: batch 8 x accumulation 1 and
batch 1 x accumulation 8 give the same update.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import unwrap

IGNORE_INDEX = -100   # labels with this value are not predicted (padding, unmasked MLM tokens)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor                                   # scalar: SUM of the per-unit losses
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, also sums over units


class Objective(Protocol):
    """What the training loop needs from an objective."""

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units the loss sums over (known before the forward pass)."""
        ...

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        ...


class TokenPrediction:
    """Cross-entropy on every position whose label is not IGNORE_INDEX.

    Batch: input_ids [B, T], labels [B, T], optional attention_mask [B, T] (1 = token, 0 = pad).
    The model maps input_ids to logits [B, T, V].
    """

    accuracy_name = "accuracy"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))   # [B, T, V]
        # fp32 loss: a bf16 log-softmax over a large vocabulary loses precision.
        flat_logits = logits.reshape(-1, logits.size(-1)).float()
        loss = F.cross_entropy(flat_logits, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        with torch.no_grad():
            predicted = labels != IGNORE_INDEX
            correct = ((logits.argmax(dim=-1) == labels) & predicted).sum().float()
        metrics = {self.accuracy_name: correct}
        aux = getattr(unwrap(model), "last_aux_loss", None)
        if aux is not None:
            # The MoE balancing loss is a per-forward mean; weighting it by this batch's units keeps
            # it a mean after the loop divides the summed loss by the step's units. It regularises
            # training only: in eval mode the loss stays the pure cross-entropy (for ppl and bpb).
            units = predicted.sum()
            metrics["aux_loss"] = aux.detach() * units
            if model.training:
                loss = loss + aux * units
        return ObjectiveOutput(loss, metrics)


class CausalLMObjective(TokenPrediction):
    """Next-token prediction (GPT). labels[t] = input_ids[t + 1], done by the data loader."""

    accuracy_name = "accuracy"


class MaskedLMObjective(TokenPrediction):
    """Masked-token prediction (BERT). labels = IGNORE_INDEX except at the masked positions."""

    accuracy_name = "mlm_accuracy"


def objective_for(arch: str) -> TokenPrediction:
    return CausalLMObjective() if arch == "gpt" else MaskedLMObjective()
