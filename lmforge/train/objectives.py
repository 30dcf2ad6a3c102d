"""Objectives: what to optimise, separate from how the loop optimises it.

An objective turns a batch into a loss plus metrics. The training loop never looks inside: SFT,
reward models, DPO, PPO and GRPO plug in as new objectives, not as new loops.

    class MyObjective(Objective):
        def units(self, batch): ...                  # what the loss is a sum over (tokens, pairs)
        def __call__(self, model, batch): ...        # -> ObjectiveOutput(loss_sum, metrics)
    # optional hooks, with defaults below:
        def setup(self, ctx): ...                    # take frozen models: ctx.frozen["reference"]
        def prepare(self, batch, ctx): ...           # no-grad work before the loss (rollouts, ref log-probs)
        def trainable_modules(self): ...             # extra trained modules (a value head)
        def tokens(self, batch): ...                 # the throughput count
        def state_dict(self) / load_state_dict(s)    # objective state that must survive a resume

Losses are *sums* over the batch's units (predicted tokens for language modelling; pairs for
DPO), and `units(batch)` counts them without a forward pass (after `prepare`). The loop divides by
the number of units in the whole optimizer step (every micro-batch, every process), so the
gradient is the mean over all units however they were split into micro-batches and padding:
batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same update.

A metric is either a tensor summed over the same units as the loss (reported as a mean per unit),
or a `Mean(total, count)` that carries its own denominator (reward accuracy per pair while the
loss is per token; mean response length per sequence).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from .losses import IGNORE_INDEX, labelled_positions, token_logprobs

if TYPE_CHECKING:
    from .context import TrainContext

# Batch keys a causal LM's forward accepts (packed sequences add position_ids and document_ids).
MODEL_INPUTS = ("attention_mask", "position_ids", "document_ids")


@dataclass
class Mean:
    """A metric with its own denominator: reported as total / count, both summed over the step."""

    total: torch.Tensor | float
    count: torch.Tensor | float


Metric = Union[torch.Tensor, Mean]


class MetricSums:
    """An objective's metrics summed over micro-batches (and, through `flat`, over processes).

    Per-unit metrics are divided by the step's units; a Mean by its own summed count (NaN when the
    count is 0: nothing was measured). Every process must report the same metric names.
    """

    def __init__(self) -> None:
        self.per_unit: dict[str, torch.Tensor] = {}
        self.mean: dict[str, list[torch.Tensor]] = {}

    def add(self, metrics: dict[str, Metric]) -> None:
        for name, value in metrics.items():
            if isinstance(value, Mean):
                total, count = (torch.as_tensor(v, dtype=torch.float64).detach() for v in (value.total, value.count))
                if name in self.mean:
                    self.mean[name][0] = self.mean[name][0] + total.to(self.mean[name][0].device)
                    self.mean[name][1] = self.mean[name][1] + count.to(self.mean[name][1].device)
                else:
                    self.mean[name] = [total, count]
            else:
                value = value.detach().double()
                self.per_unit[name] = self.per_unit[name] + value if name in self.per_unit else value

    def flat(self, device: torch.device | str) -> torch.Tensor:
        """float64 [n]: the per-unit sums, then (total, count) of each Mean, in name order."""
        values = [self.per_unit[name].to(device) for name in sorted(self.per_unit)]
        for name in sorted(self.mean):
            values.extend(part.to(device) for part in self.mean[name])
        return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=device)

    def means(self, flat: list[float], units: float) -> dict[str, float]:
        """The reported values from `flat` (summed over processes) and the step's units."""
        names = sorted(self.per_unit)
        result = {name: flat[index] / units for index, name in enumerate(names)}
        offset = len(names)
        for index, name in enumerate(sorted(self.mean)):
            total, count = flat[offset + 2 * index], flat[offset + 2 * index + 1]
            result[name] = total / count if count else float("nan")
        return result


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor                                   # scalar: SUM of the per-unit losses
    metrics: dict[str, Metric] = field(default_factory=dict)   # sums over units, or Mean(total, count)


class Objective(abc.ABC):
    """The base every objective derives from; only `units` and `__call__` are required."""

    @abc.abstractmethod
    def units(self, batch: dict[str, Any]) -> float:
        """How many units the loss sums over (known before the forward pass, after `prepare`)."""

    @abc.abstractmethod
    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        """The summed loss of one micro-batch (the model is the trained, possibly wrapped, one)."""

    def setup(self, ctx: "TrainContext") -> None:
        """Called once by the Trainer, after the models are on their device (ctx.frozen holds the
        frozen ones: eval mode, no grad, sharded like the policy under FSDP)."""

    def prepare(self, batch: dict[str, Any], ctx: "TrainContext") -> dict[str, Any]:
        """No-grad work on a micro-batch before the loss: rollouts with ctx.policy(), reference
        log-probs, rewards. Runs on every process, on tensors already on ctx.device."""
        return batch

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules trained beside the model (a value head): optimised, checkpointed and resumed."""
        return {}

    def tokens(self, batch: dict[str, Any]) -> int:
        """Tokens processed, for tokens/s (default: the size of input_ids)."""
        ids = batch.get("input_ids")
        return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0

    def state_dict(self) -> dict[str, Any]:
        """Objective state saved in checkpoints (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The optional forward arguments a batch carries (padding mask, packing positions/documents)."""
    return {key: batch[key] for key in MODEL_INPUTS if batch.get(key) is not None}


class TokenPrediction(Objective):
    """Cross-entropy on every position whose label is not IGNORE_INDEX.

    Batch: input_ids [B, T], labels [B, T], optional attention_mask [B, T] (1 = token, 0 = pad),
    optional position_ids / document_ids [B, T] (packed rows, GPT only).

    select_logits: run the output layer only at labelled positions (model(..., logits_mask=...)).
    Worth it when few positions are labelled (SFT's assistant replies); pretraining labels every
    position, where the full logits and PyTorch's fused cross-entropy are faster.
    """

    accuracy_name = "accuracy"
    select_logits = False
    # fused_loss (GPT only): the model fuses its output layer with the loss (model(..., labels=...),
    # see model/lm_head_loss.py), so no [B, T, V] logits are built. False = logits, then the loss.
    fused_loss = False

    def __init__(self, fused_loss: bool | None = None) -> None:
        if fused_loss is not None:
            self.fused_loss = fused_loss

    def units(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def tokens(self, batch: dict[str, Any]) -> int:
        """Real tokens: padding (attention_mask 0) does not count toward tokens/s."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else super().tokens(batch)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        labels = batch["labels"]
        predicted = labelled_positions(labels)
        if self.fused_loss:
            output = model(batch["input_ids"], **model_inputs(batch), labels=labels,
                           logits_mask=predicted if self.select_logits else None, return_output=True)
            loss, correct, aux = output.loss_sum, output.correct, output.aux_loss
            return self._output(model, loss, correct, aux, predicted)
        if self.select_logits:
            output = model(batch["input_ids"], **model_inputs(batch), logits_mask=predicted, return_output=True)
            targets = labels[predicted]                                     # [N]
            logits, aux = output.logits, output.aux_loss                    # [N, V]
            loss = -token_logprobs(logits, targets).sum()
        else:
            logits, aux = self.full_logits(model, batch)                    # [B, T, V]
            targets = labels
            # fp32 loss: a bf16 log-softmax over a large vocabulary loses precision.
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        with torch.no_grad():
            correct = ((logits.argmax(dim=-1) == targets) & (targets != IGNORE_INDEX)).sum().float()
        return self._output(model, loss, correct, aux, predicted)

    def _output(self, model: nn.Module, loss: torch.Tensor, correct: torch.Tensor, aux: torch.Tensor | None,
                predicted: torch.Tensor) -> ObjectiveOutput:
        metrics: dict[str, Metric] = {self.accuracy_name: correct}
        if aux is not None:
            # The MoE balancing loss is a per-forward mean; weighting it by this batch's units keeps
            # it a mean after the loop divides the summed loss by the step's units. It regularises
            # training only: in eval mode the loss stays the pure cross-entropy (for ppl and bpb).
            units = predicted.sum()
            metrics["aux_loss"] = aux.detach() * units
            if model.training:
                loss = loss + aux * units
        return ObjectiveOutput(loss, metrics)

    def full_logits(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, T, V], MoE auxiliary loss or None) from a GPT's forward."""
        output = model(batch["input_ids"], **model_inputs(batch), return_output=True)
        return output.logits, output.aux_loss


class CausalLMObjective(TokenPrediction):
    """Next-token prediction (GPT). labels[t] = input_ids[t + 1], done by the data loader."""

    accuracy_name = "accuracy"
    fused_loss = True


class MaskedLMObjective(TokenPrediction):
    """Masked-token prediction (BERT). labels = IGNORE_INDEX except at the masked positions."""

    accuracy_name = "mlm_accuracy"

    def full_logits(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), return_aux=True)


class SFTObjective(TokenPrediction):
    """Supervised fine-tuning: next-token loss on the trained tokens only (the assistant replies,
    their end-of-turn token included), with the output layer run only there."""

    accuracy_name = "accuracy"
    select_logits = True
    fused_loss = True


def objective_for(arch: str) -> TokenPrediction:
    return CausalLMObjective() if arch == "gpt" else MaskedLMObjective()
