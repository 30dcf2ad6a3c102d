"""`PreferenceObjective`: the DPO family (and ORPO, KTO) as one objective for the one Trainer.

    objective = PreferenceObjective(loss_type="sigmoid", beta=0.1)
    trainer = Trainer(model, objective, PairBatches(...), config, frozen_models={"reference": ref})

Batches come from align/data.py: rows [0, B) chosen, [B, 2B) rejected, labels on the responses.
One forward over all 2B rows scores both sides (TRL's concatenated forward), with the output layer
run only at the response positions. Log-probabilities are sums over response tokens.

The reference: a frozen model (`ctx.frozen["reference"]`), or, when the policy has LoRA adapters
and no reference model is given, the policy itself with its adapters switched off (the frozen base:
no second copy of the weights). The reference is fixed, so its log-probs of a pair never change:
`prepare` computes them the first time a pair is seen and caches them by the pair's index; the
cache is part of the objective's state, so a resumed run does not recompute it.

Losses (train/losses.py, TRL 1.16's definitions): sigmoid, ipo, hinge, robust, sigmoid_norm (DPO
with a reference), simpo (CPO/SimPO, reference-free, length-normalised), orpo (chosen NLL + odds
ratio, reference-free), kto (unpaired: the batch's chosen rows are desirable examples and the
rejected rows undesirable ones; reference point = KL estimate on mismatched prompt/completion rows).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import torch
from torch import nn

from ..errors import UserError
from ..train.losses import (IGNORE_INDEX, dpo_loss, kto_kl_estimate, kto_loss, odds_ratio_loss,
                            token_logprobs)
from ..train.objectives import Mean, Objective, ObjectiveOutput

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo", "orpo", "kto"]
REFERENCE_FREE = ("simpo", "orpo")


def response_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(response token) [R], response lengths [R]) for rows [R, T] labelled on the response.
    A chosen and a rejected row share their prompt: it runs once (model/shared_prefix.py)."""
    from ..model.shared_prefix import predicted_logits

    predicted = labels != IGNORE_INDEX
    prompt_lengths = predicted.int().argmax(dim=1) + 1               # the first scored position ends the prompt
    logits, _ = predicted_logits(model, input_ids, attention_mask, predicted, prompt_lengths)     # [N, V]
    token_logps = token_logprobs(logits, labels[predicted])                              # [N]
    rows = predicted.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=labels.device).index_add(0, rows, token_logps)
    return sums, predicted.sum(dim=1)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every LoRA adapter switched off (the frozen base), restored afterwards."""
    from ..peft.lora import lora_layers

    layers = list(lora_layers(model))
    if any(layer.merged for _, layer in layers):
        raise UserError("the reference is the base with adapters off, but the adapters are merged into it; "
                        "unmerge them (or give reference=MODEL)")
    saved = [(layer, layer.lora) for _, layer in layers]
    try:
        for layer, _ in saved:
            layer.lora = nn.ModuleDict()          # no adapter on any slice: forward is W x + b
        yield model
    finally:
        for layer, adapters in saved:
            layer.lora = adapters


def mismatched_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """KTO's KL rows: row i's prompt followed by row i-1's response (TRL cycles completions by one)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows, pieces = ids.shape[0], []
    for i in range(rows):
        j = (i - 1) % rows
        start_i = int((labels[i] != IGNORE_INDEX).nonzero()[0, 0]) + 1     # first response token of row i
        start_j = int((labels[j] != IGNORE_INDEX).nonzero()[0, 0]) + 1
        end_j = int(mask[j].sum())
        pieces.append((ids[i, :start_i], ids[j, start_j:end_j], labels[j, start_j - 1:end_j - 1]))
    width = max(len(p) + len(r) for p, r, _ in pieces)
    out_ids = torch.zeros(rows, width, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros_like(out_ids)
    out_labels = torch.full_like(out_ids, IGNORE_INDEX)
    for i, (prompt, response, response_labels) in enumerate(pieces):
        n = len(prompt) + len(response)
        out_ids[i, :n] = torch.cat([prompt, response])
        out_mask[i, :n] = 1
        out_labels[i, len(prompt) - 1:n - 1] = response_labels
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}


class PreferenceObjective(Objective):
    """DPO-family loss summed over pairs (units = pairs; KTO: examples = 2 per pair)."""

    def __init__(self, loss_type: LossType = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.simpo_gamma, self.desirable_weight, self.undesirable_weight = simpo_gamma, desirable_weight, undesirable_weight
        self.cache: dict[int, tuple[float, float]] = {}     # pair index -> (ref chosen, ref rejected) log-probs
        self.reference: nn.Module | None = None
        self.ctx: Any = None

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def setup(self, ctx: Any) -> None:
        self.ctx = ctx
        self.reference = ctx.frozen.get("reference")
        if self.needs_reference and self.reference is None:
            from ..peft.lora import has_lora

            if not has_lora(ctx.trainer.raw):
                raise UserError(f"loss_type={self.loss_type} needs a reference: give a frozen reference model, "
                                "or train LoRA adapters (the base with adapters off is then the reference)")

    def units(self, batch: dict[str, Any]) -> int:
        pairs = int(batch["pair_index"].numel())
        return 2 * pairs if self.loss_type == "kto" else pairs

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    # ------------------------------------------------------------------ reference log-probs

    def reference_logps(self, rows: dict[str, torch.Tensor], ctx: Any) -> torch.Tensor:
        """Summed log-probs [R] of rows under the reference (frozen model, or the base under LoRA)."""
        with ctx.autocast():
            if self.reference is not None:
                return response_logps(self.reference, rows["input_ids"], rows["attention_mask"], rows["labels"])[0]
            with ctx.policy() as policy, adapters_disabled(policy):
                return response_logps(policy, rows["input_ids"], rows["attention_mask"], rows["labels"])[0]

    def prepare(self, batch: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if not self.needs_reference:
            return batch
        index = batch["pair_index"].tolist()
        if any(i not in self.cache for i in index):
            chosen, rejected = self.reference_logps(batch, ctx).float().chunk(2)
            for i, c, r in zip(index, chosen.tolist(), rejected.tolist()):
                self.cache.setdefault(i, (c, r))
        cached = torch.tensor([self.cache[i] for i in index], dtype=torch.float32, device=batch["input_ids"].device)
        batch["ref_logps"] = torch.cat([cached[:, 0], cached[:, 1]])          # [2B], chosen rows first
        if self.loss_type == "kto":
            kl_rows = mismatched_rows(batch)
            with ctx.policy() as policy:
                kl_logps = response_logps(policy, kl_rows["input_ids"], kl_rows["attention_mask"], kl_rows["labels"])[0]
            kl = kto_kl_estimate(kl_logps.float(), self.reference_logps(kl_rows, ctx).float())
            distributed = ctx.distributed
            if distributed.is_distributed:          # TRL: the mean of the processes' estimates, then clamp
                kl = distributed.all_reduce_sum(kl.clone()) / distributed.world_size
            batch["kl"] = kl
        return batch

    # ------------------------------------------------------------------ the loss

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        logps, lengths = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        chosen, rejected = logps.chunk(2)
        chosen_len, rejected_len = lengths.chunk(2)
        metrics: dict[str, Any] = {}
        if self.loss_type == "orpo":
            chosen_avg, rejected_avg = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
            odds, log_odds = odds_ratio_loss(chosen_avg, rejected_avg, self.beta)
            losses = -chosen_avg + odds                         # chosen NLL (per token) + odds-ratio term
            chosen_reward, rejected_reward = self.beta * chosen_avg.detach(), self.beta * rejected_avg.detach()
            metrics["log_odds"] = Mean(log_odds.detach().sum(), len(log_odds))
        elif self.loss_type == "simpo":
            zeros = torch.zeros_like(chosen)
            losses = dpo_loss(chosen, rejected, zeros, zeros, loss_type="simpo", beta=self.beta,
                              label_smoothing=self.label_smoothing, chosen_lengths=chosen_len,
                              rejected_lengths=rejected_len, simpo_gamma=self.simpo_gamma)
            chosen_reward = self.beta * (chosen / chosen_len.clamp(min=1)).detach()
            rejected_reward = self.beta * (rejected / rejected_len.clamp(min=1)).detach()
        else:
            ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
            chosen_reward = self.beta * (chosen - ref_chosen).detach()
            rejected_reward = self.beta * (rejected - ref_rejected).detach()
            if self.loss_type == "kto":
                desirable = torch.arange(len(logps), device=logps.device) < len(chosen)
                losses = kto_loss(logps, batch["ref_logps"], desirable, batch["kl"], beta=self.beta,
                                  desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
                metrics["kl"] = Mean(batch["kl"] * len(chosen), len(chosen))
            else:
                losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=self.loss_type, beta=self.beta,
                                  label_smoothing=self.label_smoothing, chosen_lengths=chosen_len,
                                  rejected_lengths=rejected_len)
        pairs = len(chosen)
        metrics.update(
            reward_accuracy=Mean((chosen_reward > rejected_reward).float().sum(), pairs),
            reward_margin=Mean((chosen_reward - rejected_reward).sum(), pairs),
            chosen_reward=Mean(chosen_reward.sum(), pairs), rejected_reward=Mean(rejected_reward.sum(), pairs),
            chosen_logps=Mean(chosen.detach().sum(), pairs), rejected_logps=Mean(rejected.detach().sum(), pairs))
        return ObjectiveOutput(losses.sum(), metrics)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        if not self.cache:
            return {}
        keys = sorted(self.cache)
        return {"ref_index": torch.tensor(keys, dtype=torch.long),
                "ref_logps": torch.tensor([self.cache[k] for k in keys], dtype=torch.float32)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("ref_index") is not None:
            for key, (c, r) in zip(state["ref_index"].tolist(), state["ref_logps"].tolist()):
                self.cache[int(key)] = (c, r)
