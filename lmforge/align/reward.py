"""Reward models: a scalar head on our GPT, trained with the Bradley-Terry loss on preference pairs.

    from lmforge.align.reward import load_reward_config, train_reward_model
    result = train_reward_model(load_reward_config("rm-smollm2-countdown", ["max_steps=20"]))
    # runs/<name>/reward_head.safetensors, and runs/<name>/hf-reward/: a transformers
    # *ForSequenceClassification directory (AutoModelForSequenceClassification loads it) with the same scores

r(x, y) = w . h_last, where h_last is the final (normed) hidden state at the last non-pad
position of prompt + response (`GPT.forward(..., return_output=True).hidden_states`); the output
layer is skipped (an empty logits_mask). The head is the objective's extra trainable module (like
PPO's value head), so the Trainer optimises, checkpoints and resumes it beside the backbone.
Loss per pair: -log sigmoid(r_c - r_r - margin) + c (r_c + r_r)^2 (train/losses.py, TRL's
RewardTrainer). Evaluation: held-out pairwise accuracy (the share with r_c > r_r), loss and margin.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import build_config
from ..errors import UserError
from ..peft.lora import LoRAConfig
from ..train.config import TrainConfig
from ..train.loop import RunResult, Trainer
from ..train.losses import bradley_terry_loss
from ..train.objectives import Mean, Objective, ObjectiveOutput
from ..train.session import RunSession


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] right-padded mask -> [B] index of each row's last real token."""
    return attention_mask.sum(dim=1) - 1


def reward_scores(model: nn.Module, head: nn.Linear, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar rewards [B] for right-padded rows [B, T]: the head on the last real token's hidden state."""
    nothing = torch.zeros_like(attention_mask, dtype=torch.bool)        # skip the output layer entirely
    hidden = model(input_ids, attention_mask=attention_mask, logits_mask=nothing, return_output=True).hidden_states
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]   # [B, d]
    return head(last.to(head.weight.dtype)).squeeze(-1)


class RewardObjective(Objective):
    """Bradley-Terry on pair batches (align/data.py: chosen rows, then rejected); units = pairs."""

    def __init__(self, d_model: int, center_coefficient: float | None = None) -> None:
        self.head = nn.Linear(d_model, 1, bias=False)          # LlamaForSequenceClassification's `score`
        nn.init.normal_(self.head.weight, std=d_model ** -0.5)
        self.center_coefficient = center_coefficient

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"score": self.head}

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["pair_index"].numel())

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        rewards = reward_scores(model, self.head, batch["input_ids"], batch["attention_mask"]).float()
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.center_coefficient)
        pairs = len(chosen)
        difference = (chosen - rejected).detach()
        return ObjectiveOutput(loss.sum(), {
            "pair_accuracy": Mean((difference > 0).float().sum(), pairs),
            "reward_margin": Mean(difference.sum(), pairs),
            "chosen_reward": Mean(chosen.detach().sum(), pairs), "rejected_reward": Mean(rejected.detach().sum(), pairs)})


@dataclass
class RewardConfig(TrainConfig):
    """Reward-model training (TrainConfig's keys plus these)."""

    name: str = "reward"
    model: str = "smollm2-135m-instruct"   # the backbone: any lmforge.load reference (usually the SFT policy)
    tokenizer: str | None = None
    pairs: str = "pairs.jsonl"
    max_pairs: int | None = None
    val_pairs: int = 32
    seq_len: int = 512
    center_rewards_coefficient: float | None = None   # TRL's name; e.g. 0.01
    export_hf: bool = True                # runs/<name>/hf-reward: transformers *ForSequenceClassification
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 5
    weight_decay: float = 0.0
    batch_size: int = 4
    max_steps: int | None = 100
    eval_interval: int = 50
    checkpoint_interval: int = 50
    log_interval: int = 5
    precision: str = "auto"
    eval_at_start: bool = True
    peft: str = "none"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # what the shared pair-data code reads (align/dpo.prepare_pair_data)
    eval_task: str | None = None
    eval_prompts: int = 0

    def validate(self) -> "RewardConfig":
        super().validate()
        if self.val_pairs < 1 or self.seq_len < 8:
            raise UserError("val_pairs must be >= 1 and seq_len >= 8; fix the config")
        if self.peft not in ("none", "lora"):
            raise UserError(f"peft must be none or lora, not {self.peft!r}; fix the config")
        return self


def load_reward_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RewardConfig:
    return build_config(RewardConfig, recipe, overrides)


def train_reward_model(config: RewardConfig, resume: bool = False) -> RunResult:
    """Train a reward model on config.pairs; writes the head and (export_hf) an HF directory."""
    from ..model.loading import load
    from ..train.sft import _with_adapters, load_causal_lm
    from .dpo import PreferenceEvaluation, merged_if_adapted, prepare_pair_data, write_preference_report

    config.validate()
    with RunSession(config, resume) as session:
        context = session.context
        config = session.with_precision(config)
        model, tokenizer = load_causal_lm(config.model, config.tokenizer, config.seed)
        model = merged_if_adapted(model, config)
        objective = RewardObjective(model.config.d_model, config.center_rewards_coefficient)
        started = time.perf_counter()
        data = prepare_pair_data(config, tokenizer, context.rank, context.world_size)
        resume_from, config_dict, tracker, progress = session.open_run(config, tokenizer)
        evaluation = PreferenceEvaluation(config, tokenizer, data, objective, context)
        model, adapters = _with_adapters(model.float(), config)
        trainer = Trainer(model, objective, data.train, config, run_dir=session.run_dir, context=context,
                          evaluate=evaluation, tracker=tracker, progress=progress, config_dict=config_dict, **adapters)
        evaluation.trainer = trainer
        if context.is_main:
            print(f"reward model on {config.pairs}: {len(data.train.pairs)} train pairs, {len(data.val.pairs)} held out "
                  f"-> {config.run_dir}", file=sys.stderr)
        result = session.fit(trainer, resume_from)
        if context.is_main:
            save_head(objective.head, session.run_dir / "reward_head.safetensors")
            if config.export_hf:
                from ..peft.lora import has_lora

                if has_lora(trainer.raw):
                    backbone, _ = load(session.run_dir)      # the run's export is the merged plain model
                else:
                    backbone = trainer.raw
                export_reward_model(backbone, objective.head, tokenizer, session.run_dir / "hf-reward")
            report = write_preference_report(config, data, evaluation, result, time.perf_counter() - started,
                                             title="Reward model report")
            print(f"report: {report}")
        return result


def save_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    from ..io import atomic_path

    with atomic_path(path) as temporary:
        save_file({"score.weight": head.weight.detach().cpu().contiguous()}, str(temporary))


def load_reward_model(run_dir: str | Path) -> tuple[nn.Module, nn.Linear, Any]:
    """(backbone, head, tokenizer) of a reward-model run directory."""
    from safetensors.torch import load_file

    from ..model.loading import load

    model, tokenizer = load(run_dir)
    weight = load_file(str(Path(run_dir) / "reward_head.safetensors"))["score.weight"]
    head = nn.Linear(weight.shape[1], 1, bias=False)
    head.weight.data.copy_(weight)
    return model, head, tokenizer


def export_reward_model(model: nn.Module, head: nn.Linear, tokenizer: Any, directory: str | Path) -> Path:
    """A transformers *ForSequenceClassification directory (num_labels 1) that scores like ours.

    The backbone is exported as lmforge's HF export does it (model/hf/); the architecture becomes
    its *ForSequenceClassification sibling, the LM head is dropped and `score.weight` added.
    transformers pools the last token that is not `pad_token_id`, so pad_token_id is written too.
    """
    from safetensors.torch import load_file, save_file

    from ..model.hf.export import export_hf
    from ..model.loading import atomic_directory

    with atomic_directory(directory) as temporary:
        export_hf(model, tokenizer, temporary)
        config_file = temporary / "config.json"
        hf = json.loads(config_file.read_text())
        (architecture,) = hf["architectures"]
        for suffix in ("ForCausalLM", "LMHeadModel"):
            architecture = architecture.replace(suffix, "ForSequenceClassification")
        hf.update(architectures=[architecture], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        pad = getattr(tokenizer, "pad_id", None)
        hf["pad_token_id"] = pad if isinstance(pad, int) else getattr(tokenizer, "eot_id", 0)
        config_file.write_text(json.dumps(hf, indent=2))
        weights = temporary / "model.safetensors"
        state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("lm_head.")}
        state["score.weight"] = head.weight.detach().cpu().float().contiguous()
        save_file(state, str(weights), metadata={"format": "pt"})
    return Path(directory)
