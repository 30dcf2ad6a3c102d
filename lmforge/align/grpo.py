"""`grpo(config)`: GRPO and RLOO with verifiable rewards, through the one Trainer.

    from lmforge.align.grpo import grpo, load_grpo_config
    result = grpo(load_grpo_config("grpo-smollm2-chain-sum", ["max_steps=10"]))

GRPO (Shao et al. 2024, DeepSeekMath): G completions per prompt; each completion's advantage is
its reward against its group's, A = (r - mean_group) / (std + 1e-4) (scale_rewards: group, batch
or none), the same for each of its tokens. The loss is PPO's clipped surrogate per token, with
DAPO's clip-higher (epsilon_high), optionally + beta k3(pi || ref), aggregated as grpo (mean of
sequence means), bnpo, dr_grpo or dapo (train/losses.py). No value model.

RLOO (Ahmadian et al. 2024): the baseline of a completion is the mean reward of the other G - 1
in its group; the KL penalty (beta, k1 summed over the sequence) is taken off the reward; the
clipped ratio is per sequence.

Logged every step: reward, accuracy (share with full marks from the verifiable reward),
frac_reward_zero_std (groups whose G rewards are all equal: they teach nothing), kl, clip_ratio,
entropy, completion_length, and the seconds spent generating (generate_s) and rolling out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import build_config
from ..errors import UserError
from ..train.losses import (IGNORE_INDEX, aggregate_token_losses, clipped_surrogate, entropy_from_logits,
                            group_advantages, k3_kl, leave_one_out_advantages)
from ..train.loop import RunResult
from ..train.objectives import Mean, ObjectiveOutput
from .rewards import Prompt
from .rl_run import OnPolicyConfig, run_on_policy
from .rollout import OnPolicyObjective, token_logps_and_hidden


@dataclass
class GRPOConfig(OnPolicyConfig):
    """GRPO / RLOO (OnPolicyConfig's keys plus these)."""

    name: str = "grpo"
    method: Literal["grpo", "rloo"] = "grpo"
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"   # GRPO only (RLOO: a per-sequence mean)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = 0.2
    epsilon_high: float | None = None        # DAPO's clip-higher (e.g. 0.28); default = epsilon
    normalize_advantages: bool = False       # RLOO: whiten the advantages over the generation

    def validate(self) -> "GRPOConfig":
        super().validate()
        if self.method == "rloo" and self.num_generations < 2:
            raise UserError("RLOO's leave-one-out baseline needs num_generations >= 2; fix the config")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise UserError("epsilon and epsilon_high must be positive; fix the config")
        return self


def load_grpo_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> GRPOConfig:
    return build_config(GRPOConfig, recipe, overrides)


class GRPOObjective(OnPolicyObjective):
    """GRPO or RLOO on groups of completions; see the module docstring."""

    def __init__(self, tokenizer: Any, rewards: Any, *, method: str = "grpo", loss_type: str = "dapo",
                 scale_rewards: str = "group", epsilon: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, normalize_advantages: bool = False, **rollout: Any) -> None:
        super().__init__(tokenizer, rewards, **rollout)
        self.method, self.loss_type, self.scale_rewards = method, loss_type, scale_rewards
        self.epsilon_low, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.beta, self.normalize_advantages = beta, normalize_advantages
        self.needs_reference = beta > 0

    @property
    def off_policy(self) -> bool:
        # RLOO's KL penalty is on the reward, from the sampling policy's log-probs: store them.
        return super().off_policy or (self.method == "rloo" and self.beta > 0)

    def score(self, buffer: dict[str, torch.Tensor], prompts: list[Prompt], texts: list[str], ctx: Any,
              policy: nn.Module) -> dict[str, float]:
        rewards, group = buffer["rewards"], self.group_size
        grouped = rewards.view(-1, group)
        zero_std = (grouped.max(dim=1).values == grouped.min(dim=1).values).float()
        metrics = {"frac_reward_zero_std": float(zero_std.mean()), "reward_std": float(grouped.std(dim=1).mean())
                   if group > 1 else 0.0}
        if self.method == "rloo":
            if self.beta > 0:
                mask = (buffer["labels"] != IGNORE_INDEX).float()
                sequence_kl = ((buffer["old_logps"] - buffer["ref_logps"]) * mask).sum(dim=1)     # k1, summed
                rewards = rewards - self.beta * sequence_kl
                metrics["kl"] = float(sequence_kl.sum() / mask.sum().clamp(min=1))
            advantages = leave_one_out_advantages(rewards, group)
            if self.normalize_advantages:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
        else:
            batch_std = global_std(rewards, ctx) if self.scale_rewards == "batch" else None
            advantages = group_advantages(rewards, group, self.scale_rewards, batch_std)[0]
        buffer["advantages"] = advantages
        return metrics

    def micro_batch_units(self, rows: dict[str, torch.Tensor]) -> float:
        if self.method == "rloo":
            return float(rows["input_ids"].shape[0])
        predicted = rows["labels"] != IGNORE_INDEX
        rows_of_tokens = predicted.nonzero()[:, 0]
        return aggregate_token_losses(torch.zeros(len(rows_of_tokens)), rows_of_tokens, predicted.shape[0],
                                      self.loss_type, self.max_new_tokens)[1]

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        predicted = batch["labels"] != IGNORE_INDEX
        rows_of_tokens = predicted.nonzero()[:, 0]                     # [M]
        n = predicted.shape[0]
        logps, logits, _ = token_logps_and_hidden(model, batch)        # [M], [M, V]
        old = batch["old_logps"][predicted] if "old_logps" in batch else logps.detach()
        metrics: dict[str, Any] = self.row_metrics(batch)
        tokens = len(logps)
        if self.method == "rloo":
            sums = torch.zeros(n, device=logps.device).index_add(0, rows_of_tokens, logps)
            old_sums = torch.zeros(n, device=logps.device).index_add(0, rows_of_tokens, old)
            losses, clipped = clipped_surrogate(sums, old_sums, batch["advantages"], self.epsilon_low, self.epsilon_high)
            loss = losses.sum()
            metrics["clip_ratio"] = Mean(clipped.float().sum(), n)
        else:
            advantages = batch["advantages"][rows_of_tokens]
            per_token, clipped = clipped_surrogate(logps, old, advantages, self.epsilon_low, self.epsilon_high)
            if self.beta > 0:
                kl = k3_kl(logps, batch["ref_logps"][predicted])
                per_token = per_token + self.beta * kl
                metrics["kl"] = Mean(kl.detach().sum(), tokens)
            loss = aggregate_token_losses(per_token, rows_of_tokens, n, self.loss_type, self.max_new_tokens)[0]
            metrics["clip_ratio"] = Mean(clipped.float().sum(), tokens)
        with torch.no_grad():
            metrics["entropy"] = Mean(entropy_from_logits(logits.detach()).sum(), tokens)
        return ObjectiveOutput(loss, metrics)


def global_std(values: torch.Tensor, ctx: Any) -> torch.Tensor:
    """The unbiased std of `values` over every process (scale_rewards=batch)."""
    stats = torch.stack([values.sum(), (values ** 2).sum(), torch.tensor(float(values.numel()), device=values.device)])
    total, squares, count = ctx.distributed.all_reduce_sum(stats.double()).tolist()
    mean = total / count
    return torch.tensor(max(squares - count * mean * mean, 0.0) / max(count - 1, 1), device=values.device).sqrt()


def build_grpo_objective(config: GRPOConfig, tokenizer: Any, rewards: Any, model: nn.Module) -> GRPOObjective:
    objective = GRPOObjective(
        tokenizer, rewards, method=config.method, loss_type=config.loss_type, scale_rewards=config.scale_rewards,
        epsilon=config.epsilon, epsilon_high=config.epsilon_high, beta=config.beta,
        normalize_advantages=config.normalize_advantages, group_size=config.num_generations,
        batch_size=config.batch_size, steps_per_generation=config.steps_per_generation, grad_accum=config.grad_accum,
        num_iterations=config.num_iterations, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_p=config.top_p, top_k=config.top_k, seed=config.seed, rollout_batch_size=config.rollout_batch_size,
        compile_rollouts=config.compile_rollouts, max_prompt_tokens=config.max_prompt_tokens)
    return objective


def grpo(config: GRPOConfig, resume: bool = False) -> RunResult:
    """Train config.model on config.prompts with GRPO or RLOO; `resume` continues the run."""
    return run_on_policy(config, build_grpo_objective, title=f"{config.method.upper()} report", resume=resume)
