"""`ppo(config)`: PPO as in InstructGPT (Ouyang et al. 2022), through the one Trainer.

    from lmforge.align.ppo import ppo, load_ppo_config
    result = ppo(load_ppo_config("ppo-smollm2-chain-sum", ["reward_model=runs/rm-chain-sum"]))

The policy carries a value head (a linear layer on its final hidden states: the objective's
extra trainable module). Per generation, no grad:
  1. completions sampled from the policy by lmforge's engine (batched, KV cache);
  2. the score: a frozen reward model (`lmforge align reward` run) on prompt + completion, or the
     configured reward functions; completions that never emitted the end token lose
     missing_eos_penalty;
  3. per-token reward r_t = -kl_coef KL_t (k1: log pi_old - log ref, or k3), plus the score on the
     last completion token;
  4. values V_t from the value head; GAE(gamma, lam) advantages, whitened; returns = A + V.
Then num_iterations epochs over the generation in steps_per_generation x grad_accum minibatches:
the clipped policy loss plus vf_coef x the clipped value loss, a mean over completion tokens
(train/losses.py, TRL's PPOTrainer). The KL coefficient is fixed, or adaptive (Ziegler et al.
2019): it grows when the measured KL is above kl_target and shrinks below it; its value is part
of the objective's state, so it survives a resume.

Logged: reward (the score), kl (summed per sequence), kl_coef, entropy, clip_ratio, value_clip_ratio,
value_loss, policy_loss, approx_kl, completion_length, and generation time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import build_config
from ..errors import UserError
from ..train.losses import (IGNORE_INDEX, clipped_surrogate, clipped_value_loss, entropy_from_logits, gae,
                            whiten)
from ..train.loop import RunResult
from ..train.objectives import Mean, ObjectiveOutput
from .rewards import Prompt
from .rl_run import OnPolicyConfig, run_on_policy
from .rollout import OnPolicyObjective, token_logps_and_hidden


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO (OnPolicyConfig's keys plus these). `beta` is the (initial) KL coefficient."""

    name: str = "ppo"
    reward_model: str | None = None      # a reward-model run directory; None: the `rewards` functions score
    num_generations: int = 1             # InstructGPT samples one completion per prompt
    beta: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0               # adaptive: the KL (nats per sequence) the coefficient steers toward
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    num_iterations: int = 4              # PPO epochs over each generation
    steps_per_generation: int = 2        # minibatches (optimizer steps) per epoch
    value_lr_scale: float = 1.0          # the value head's learning rate relative to lr

    def validate(self) -> "PPOConfig":
        super().validate()
        checks = [(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "gamma must be in (0, 1] and lam in [0, 1]"),
                  (self.cliprange > 0 and self.cliprange_value > 0, "cliprange and cliprange_value must be positive"),
                  (self.vf_coef >= 0, "vf_coef must be >= 0"), (self.kl_target > 0 and self.kl_horizon > 0,
                                                                "kl_target and kl_horizon must be positive")]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message}; fix the config")
        return self


def load_ppo_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> PPOConfig:
    return build_config(PPOConfig, recipe, overrides)


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019's proportional controller):
    value *= 1 + clip(KL / target - 1, -0.2, 0.2) x n / horizon after each generation of n sequences."""

    def __init__(self, value: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000) -> None:
        self.value, self.adaptive, self.target, self.horizon = value, adaptive, target, horizon

    def update(self, kl: float, sequences: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * sequences / self.horizon


class RewardModel(nn.Module):
    """A reward-model run as one frozen module: the backbone and its scalar head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from .reward import reward_scores

        return reward_scores(self.backbone, self.head, input_ids, attention_mask).float()


class PPOObjective(OnPolicyObjective):
    """InstructGPT's PPO; see the module docstring."""

    def __init__(self, tokenizer: Any, rewards: Any, d_model: int, *, kl: KLController, kl_estimator: str = "k1",
                 gamma: float = 1.0, lam: float = 0.95, cliprange: float = 0.2, cliprange_value: float = 0.2,
                 vf_coef: float = 0.1, whiten_rewards: bool = False, missing_eos_penalty: float | None = None,
                 value_lr_scale: float = 1.0, **rollout: Any) -> None:
        super().__init__(tokenizer, rewards, **rollout)
        self.value_head = nn.Linear(d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.kl, self.kl_estimator, self.gamma, self.lam = kl, kl_estimator, gamma, lam
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.whiten_rewards, self.missing_eos_penalty = whiten_rewards, missing_eos_penalty
        self.extras_lr_scale = value_lr_scale
        self.needs_reference = True
        self.reward_model: nn.Module | None = None

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head}

    def setup(self, ctx: Any) -> None:
        super().setup(ctx)
        self.reward_model = ctx.frozen.get("reward")
        if self.reward_model is None and self.rewards is None:
            raise UserError("PPO needs a score: give reward_model=RUN_DIR or reward functions (rewards=[...])")

    def policy_statistics(self, policy: nn.Module, buffer: dict[str, torch.Tensor], ctx: Any) -> None:
        # The value head lives on the device beside the policy (ctx.extras), trained with it.
        head = ctx.extras["value_head"]
        buffer["old_logps"], buffer["old_values"] = self.per_token_logps(policy, buffer, ctx, value_head=head)

    def score(self, buffer: dict[str, torch.Tensor], prompts: list[Prompt], texts: list[str], ctx: Any,
              policy: nn.Module) -> dict[str, float]:
        mask = (buffer["labels"] != IGNORE_INDEX).float()                              # [N, T]
        if self.reward_model is not None:
            with ctx.autocast():
                scores = torch.cat([self.reward_model(buffer["input_ids"][i:i + self.batch_size],
                                                      buffer["attention_mask"][i:i + self.batch_size])
                                    for i in range(0, buffer["input_ids"].shape[0], self.batch_size)]).float()
        else:
            scores = buffer["rewards"].clone()
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~buffer["stopped"]).float()
        log_ratio = buffer["old_logps"] - buffer["ref_logps"]                         # log pi_old - log ref
        kl = log_ratio if self.kl_estimator == "k1" else (torch.exp(-log_ratio) - 1) + log_ratio
        kl = kl * mask
        rewards = -self.kl.value * kl
        last = mask.cumsum(dim=1).argmax(dim=1)                                       # each row's last completion token
        rewards[torch.arange(len(last), device=last.device), last] += scores
        if self.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, buffer["old_values"], mask, self.gamma, self.lam)
        buffer["advantages"], buffer["returns"] = whiten(advantages, mask), returns
        buffer["rewards"] = scores                                                    # what row_metrics logs as reward
        sequence_kl = kl.sum(dim=1)
        stats = ctx.distributed.all_reduce_sum(torch.stack([sequence_kl.sum(), torch.tensor(
            float(len(sequence_kl)), device=kl.device)]).double()).tolist()
        coefficient = self.kl.value
        self.kl.update(stats[0] / stats[1], int(stats[1]))
        return {"kl": stats[0] / stats[1], "kl_coef": coefficient,
                "non_score_reward": float((-coefficient * sequence_kl).mean())}

    def micro_batch_units(self, rows: dict[str, torch.Tensor]) -> float:
        return float((rows["labels"] != IGNORE_INDEX).sum())           # a mean over completion tokens

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        predicted = batch["labels"] != IGNORE_INDEX
        logps, logits, hidden = token_logps_and_hidden(model, batch, hidden=True)   # [M], [M, V], [M, d]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        old, advantages = batch["old_logps"][predicted], batch["advantages"][predicted]
        policy_losses, clipped = clipped_surrogate(logps, old, advantages, self.cliprange, self.cliprange)
        value_losses, value_clipped = clipped_value_loss(values, batch["old_values"][predicted],
                                                         batch["returns"][predicted], self.cliprange_value)
        loss = policy_losses.sum() + self.vf_coef * value_losses.sum()
        tokens = len(logps)
        metrics: dict[str, Any] = self.row_metrics(batch)
        with torch.no_grad():
            metrics.update(policy_loss=Mean(policy_losses.detach().sum(), tokens),
                           value_loss=Mean(value_losses.detach().sum(), tokens),
                           clip_ratio=Mean(clipped.float().sum(), tokens),
                           value_clip_ratio=Mean(value_clipped.float().sum(), tokens),
                           approx_kl=Mean((0.5 * (logps.detach() - old) ** 2).sum(), tokens),
                           entropy=Mean(entropy_from_logits(logits.detach()).sum(), tokens))
        return ObjectiveOutput(loss, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kl_coef": self.kl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "kl_coef" in state:
            self.kl.value = float(state["kl_coef"])


def load_reward_model_module(config: PPOConfig, policy_and_tokenizer: tuple[Any, Any]) -> dict[str, nn.Module]:
    """{"reward": the reward-model run as a frozen module}, refused if its vocabulary differs."""
    if config.reward_model is None:
        return {}
    from .dpo import check_same_vocabulary
    from .reward import load_reward_model

    path = Path(config.reward_model)
    if not (path / "reward_head.safetensors").is_file():
        raise UserError(f"reward_model '{config.reward_model}' is not a reward-model run (no reward_head.safetensors); "
                        "train one with `lmforge align reward`")
    backbone, head, tokenizer = load_reward_model(path)
    model, policy_tokenizer = policy_and_tokenizer
    check_same_vocabulary(model, policy_tokenizer, backbone, tokenizer, config.reward_model)
    return {"reward": RewardModel(backbone.float(), head.float())}


def reward_model_scorer(frozen: dict[str, nn.Module], tokenizer: Any) -> Any:
    """For the evaluation: the reward model's score of greedy answers (prompt + reply in the chat template)."""
    reward_model = frozen.get("reward")
    if reward_model is None:
        return None

    def score(model: nn.Module, prompts: list[Prompt], answers: list[str]) -> list[float]:
        from ..tokenizer.chat_template import render_chat_ids
        from .rollout import rollout_tensors

        ids = [render_chat_ids(tokenizer, p.messages + [{"role": "assistant", "content": a}])[0]
               for p, a in zip(prompts, answers)]
        rows = rollout_tensors([x[:1] for x in ids], [x[1:] for x in ids], 0)
        device = next(reward_model.parameters()).device
        with torch.no_grad():
            return reward_model(rows["input_ids"].to(device), rows["attention_mask"].to(device)).tolist()
    return score


def build_ppo_objective(config: PPOConfig, tokenizer: Any, rewards: Any, model: nn.Module) -> PPOObjective:
    return PPOObjective(
        tokenizer, rewards, model.config.d_model,
        kl=KLController(config.beta, config.adaptive_kl, config.kl_target, config.kl_horizon),
        kl_estimator=config.kl_estimator, gamma=config.gamma, lam=config.lam, cliprange=config.cliprange,
        cliprange_value=config.cliprange_value, vf_coef=config.vf_coef, whiten_rewards=config.whiten_rewards,
        missing_eos_penalty=config.missing_eos_penalty, value_lr_scale=config.value_lr_scale,
        group_size=config.num_generations, batch_size=config.batch_size,
        steps_per_generation=config.steps_per_generation, grad_accum=config.grad_accum,
        num_iterations=config.num_iterations, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_p=config.top_p, top_k=config.top_k, seed=config.seed, rollout_batch_size=config.rollout_batch_size,
        compile_rollouts=config.compile_rollouts, max_prompt_tokens=config.max_prompt_tokens)


def ppo(config: PPOConfig, resume: bool = False) -> RunResult:
    """Train config.model with PPO against config.reward_model (or the reward functions)."""
    if config.beta <= 0:
        raise UserError("PPO's KL penalty needs beta > 0 (InstructGPT's leash to the reference); fix the config")
    return run_on_policy(config, build_ppo_objective, title="PPO report", resume=resume,
                         extra_frozen=load_reward_model_module, reward_model_score=reward_model_scorer)
