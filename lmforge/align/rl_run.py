"""What GRPO, RLOO and PPO runs share: the config keys, held-out evaluation, the report, the run.

    result = run_on_policy(config, build_objective, title="GRPO report")

Evaluation (every eval_interval, and before the first step): the held-out prompts are answered
greedily (val_reward: the configured rewards' total; val_accuracy: the verifiable reward's share
of full marks) and, with eval_samples = k > 1, k times at eval_temperature (val_pass@k, the
unbiased estimator; val_sample_accuracy). A PPO run adds the reward model's score of the greedy
answers (val_rm_score), so reward over-optimisation shows as val_rm_score rising while
val_accuracy does not.
"""
from __future__ import annotations

import copy
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import to_dict
from ..errors import UserError
from ..peft.lora import LoRAConfig
from ..train.config import TrainConfig
from ..train.loop import RunResult, Trainer
from ..train.session import RunSession
from .rewards import Prompt, RewardFunctions, load_prompts


@dataclass
class OnPolicyConfig(TrainConfig):
    """Keys every on-policy method has (TrainConfig's keys plus these)."""

    model: str = "smollm2-135m-instruct"  # the starting policy: any lmforge.load reference
    tokenizer: str | None = None
    reference: str | None = None          # KL reference; default a frozen copy of model (LoRA: the base, adapters off)
    prompts: str = "reasoning-gym:chain_sum?size=512&seed=0"   # or a JSONL of {"prompt", "answer"?, "meta"?}
    max_prompts: int | None = None
    system_prompt: str | None = None      # a system turn put before every prompt that has none (e.g. the answer format)
    eval_prompts: str | None = None       # held-out prompts (same syntax); default: val_prompts held out of prompts
    val_prompts: int = 32
    rewards: list[str] = field(default_factory=lambda: ["task"])   # task | gsm8k | format | package.module:function
    reward_weights: list[float] | None = None
    num_generations: int = 8              # G: completions per prompt
    max_new_tokens: int = 64
    max_prompt_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    steps_per_generation: int = 1         # optimizer steps each generation is split over
    num_iterations: int = 1               # passes over each generation (PPO's epochs); >1 reuses old rollouts
    beta: float = 0.0                     # KL coefficient (GRPO: k3 in the loss; RLOO: k1 in the reward)
    rollout_batch_size: int = 64          # engine rows (sequences decoded together)
    compile_rollouts: bool = False        # the engine's compiled decode step
    eval_samples: int = 4                 # k for val_pass@k (1 = greedy only)
    eval_temperature: float = 1.0
    sample_count: int = 2                 # held-out answers written to the tracker at each evaluation
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 16                  # completions per micro-batch (TRL's per_device_train_batch_size)
    max_steps: int | None = 50
    eval_interval: int = 25
    checkpoint_interval: int = 25
    log_interval: int = 1
    precision: str = "auto"
    eval_at_start: bool = True
    peft: str = "none"                    # none | lora (lora.* as for sft)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> "OnPolicyConfig":
        super().validate()
        rows = self.batch_size * self.grad_accum * self.steps_per_generation
        checks = [
            (self.num_generations >= 1, f"num_generations must be at least 1, not {self.num_generations}"),
            (rows % self.num_generations == 0, f"batch_size x grad_accum x steps_per_generation = {rows} completions "
             f"per generation must be a multiple of num_generations={self.num_generations}"),
            (self.max_new_tokens >= 1 and self.max_prompt_tokens >= 1, "max_new_tokens and max_prompt_tokens must be >= 1"),
            (self.temperature > 0, f"temperature must be positive for sampling, not {self.temperature}"),
            (self.steps_per_generation >= 1 and self.num_iterations >= 1,
             "steps_per_generation and num_iterations must be at least 1"),
            (self.beta >= 0, f"beta must be >= 0, not {self.beta}"),
            (self.eval_samples >= 1, "eval_samples must be at least 1"),
            (self.val_prompts >= 1 or self.eval_prompts is not None, "val_prompts must be at least 1"),
            (self.peft in ("none", "lora"), f"peft must be none or lora, not {self.peft!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message}; fix the config")
        if self.peft == "lora":
            self.lora.validate()
        return self


def with_system(prompts: list[Prompt], system: str | None) -> list[Prompt]:
    """The prompts with a system turn first (those that already have one are kept as they are)."""
    if not system:
        return prompts
    return [p if p.messages[0]["role"] == "system" else
            Prompt([{"role": "system", "content": system}, *p.messages], p.answer, p.meta, p.source) for p in prompts]


def split_prompts(config: OnPolicyConfig) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts): eval_prompts if given, else val_prompts held out by the seed."""
    prompts = with_system(load_prompts(config.prompts, config.max_prompts), config.system_prompt)
    if config.eval_prompts is not None:
        return prompts, with_system(load_prompts(config.eval_prompts)[:config.val_prompts], config.system_prompt)
    if len(prompts) <= config.val_prompts:
        raise UserError(f"prompts '{config.prompts}' gives {len(prompts)} prompts, not more than val_prompts="
                        f"{config.val_prompts}; add prompts, lower val_prompts or set eval_prompts")
    order = list(range(len(prompts)))
    random.Random(config.seed).shuffle(order)
    held_out = set(order[:config.val_prompts])
    return ([p for i, p in enumerate(prompts) if i not in held_out], [prompts[i] for i in sorted(held_out)])


class RolloutEvaluation:
    """The Trainer's evaluate callable: held-out answers, scored; see the module docstring."""

    def __init__(self, config: OnPolicyConfig, tokenizer: Any, prompts: list[Prompt], rewards: RewardFunctions,
                 context: Any, reward_model: Callable[[torch.nn.Module, list[Prompt], list[str]], list[float]] | None = None
                 ) -> None:
        self.config, self.tokenizer, self.rewards, self.context = config, tokenizer, rewards, context
        self.prompts = prompts[context.rank::context.world_size]     # each process answers its share
        self.reward_model = reward_model
        self.trainer: Any = None
        self.answers: dict[int, list[str]] = {}
        self.metrics: dict[int, dict[str, float]] = {}

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        from ..eval.metrics import pass_at_k
        from .rollout import RolloutSampler

        config, step = self.config, self.trainer.step if self.trainer is not None else 0
        sampler = RolloutSampler(self.tokenizer, config.max_new_tokens, config.eval_temperature, config.top_p,
                                 config.top_k, min(config.rollout_batch_size, max(1, len(self.prompts)) * config.eval_samples),
                                 config.max_prompt_tokens)
        sums: dict[str, float] = {}
        if self.prompts:
            greedy = sampler.sample(model, self.prompts, 1, seed=0, temperature=0.0)[2]
            totals, per_function = self.rewards(self.prompts, greedy)
            sums["val_reward"] = sum(totals)
            verifiable = self.rewards.verifiable
            if verifiable is not None:
                sums["val_accuracy"] = sum(s >= 1.0 for s in per_function[verifiable])
            if self.reward_model is not None:
                sums["val_rm_score"] = sum(self.reward_model(model, self.prompts, greedy))
            sums["val_completion_chars"] = float(sum(len(a) for a in greedy))
            if config.eval_samples > 1 and verifiable is not None:
                texts = sampler.sample(model, self.prompts, config.eval_samples, seed=12345, temperature=config.eval_temperature)[2]
                prompts = [p for p in self.prompts for _ in range(config.eval_samples)]
                correct = [s >= 1.0 for s in self.rewards(prompts, texts)[1][verifiable]]
                k = config.eval_samples
                sums[f"val_pass@{k}"] = sum(pass_at_k(k, sum(correct[i * k:(i + 1) * k]), k)
                                            for i in range(len(self.prompts)))
                sums["val_sample_accuracy"] = sum(correct) / k
            self.answers[step] = greedy
            if self.trainer is not None and self.trainer.tracker is not None:
                for prompt, answer in list(zip(self.prompts, greedy))[:config.sample_count]:
                    self.trainer.tracker.log_text(step, "sample", f"{prompt.text}\n--> {answer or '(empty reply)'}")
        names = sorted(set(sums) | {"val_reward", "val_completion_chars"})
        local = torch.tensor([sums.get(n, 0.0) for n in names] + [float(len(self.prompts))], dtype=torch.float64,
                             device=self.context.device)
        totals = self.context.all_reduce_sum(local).tolist()
        count = max(totals[-1], 1.0)
        metrics = {name: value / count for name, value in zip(names, totals[:-1])}
        self.metrics[step] = dict(metrics)
        return metrics


def build_reference(config: OnPolicyConfig, model: torch.nn.Module, tokenizer: Any) -> dict[str, torch.nn.Module]:
    """The frozen reference when the KL penalty is on: reference=MODEL, else a copy of the policy
    (with LoRA none: the base with the adapters off serves, no second copy)."""
    from ..model.loading import load
    from .dpo import check_same_vocabulary

    if config.beta == 0:
        return {}
    if config.reference is not None:
        reference, reference_tokenizer = load(config.reference)
        check_same_vocabulary(model, tokenizer, reference, reference_tokenizer, config.reference)
        return {"reference": reference.float()}
    return {} if config.peft == "lora" else {"reference": copy.deepcopy(model).float()}


def run_on_policy(config: OnPolicyConfig, build_objective: Callable[..., Any], title: str, resume: bool = False,
                  extra_frozen: Callable[[Any, Any], dict[str, torch.nn.Module]] | None = None,
                  reward_model_score: Any = None) -> RunResult:
    """Load, check, train and report an on-policy run (GRPO, RLOO, PPO share every step of it).

    build_objective(config, tokenizer, rewards, model) -> the objective; extra_frozen(config, (model,
    tokenizer)) -> more frozen models (PPO's reward model); reward_model_score(frozen, tokenizer) -> the
    evaluation's RM scorer."""
    from ..train.sft import _with_adapters, load_causal_lm
    from .dpo import merged_if_adapted
    from .rollout import PromptBatches

    config.validate()
    with RunSession(config, resume) as session:
        context = session.context
        config = session.with_precision(config)
        model, tokenizer = load_causal_lm(config.model, config.tokenizer, config.seed)
        model = merged_if_adapted(model, config)
        rewards = RewardFunctions(config.rewards, config.reward_weights)
        train_prompts, held_out = split_prompts(config)
        rewards(held_out[:1], [held_out[0].answer or ""])   # a reward that cannot score these prompts fails now
        frozen = build_reference(config, model, tokenizer)
        if extra_frozen is not None:
            frozen.update(extra_frozen(config, (model, tokenizer)))
        objective = build_objective(config, tokenizer, rewards, model)
        batches = PromptBatches(train_prompts, objective.prompts_per_generation, objective.updates_per_generation,
                                seed=config.seed, rank=context.rank, world_size=context.world_size)
        started = time.perf_counter()
        resume_from, config_dict, tracker, progress = session.open_run(config, tokenizer)
        evaluation = RolloutEvaluation(config, tokenizer, held_out, rewards, context,
                                       reward_model_score(frozen, tokenizer) if reward_model_score is not None else None)
        model, adapters = _with_adapters(model.float(), config)
        trainer = Trainer(model, objective, batches, config, run_dir=session.run_dir, context=context,
                          evaluate=evaluation, tracker=tracker, progress=progress, frozen_models=frozen,
                          config_dict=config_dict, **adapters)
        evaluation.trainer = trainer
        if context.is_main:
            print(f"{title.split()[0]} on {config.prompts}: {len(train_prompts)} training prompts, {len(held_out)} held "
                  f"out; {objective.prompts_per_generation} prompts x {config.num_generations} completions per "
                  f"generation; rewards {', '.join(config.rewards)} -> {config.run_dir}", file=sys.stderr)
        result = session.fit(trainer, resume_from)
        if context.is_main:
            report = write_rl_report(config, title, evaluation, held_out, result, time.perf_counter() - started)
            print(f"report: {report}")
        return result


def write_rl_report(config: OnPolicyConfig, title: str, evaluation: RolloutEvaluation, held_out: list[Prompt],
                    result: RunResult, total_seconds: float) -> Path:
    """runs/<name>/report.md + report.json + curves.png: held-out figures before and after, answers."""
    import yaml

    from ..io import write_json_atomic, write_text_atomic
    from ..track import plot_runs
    from ..train.sft_eval import _fmt, _inline, cpu_description

    run_dir = Path(result.run_dir)
    before, after = evaluation.metrics.get(0, {}), evaluation.metrics.get(result.step, result.eval_metrics)
    rows = [row for row in result.history if "generate_s" in row and row.get("generate_s") == row.get("generate_s")]
    step_rows = [row for row in result.history if "reward" in row]
    machine = f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    plot_runs([run_dir], run_dir / "curves.png", title=f"{title}: {config.model}")
    lines = [f"# {title}: {run_dir.name}", "", f"`{config.model}` on `{config.prompts}`, rewards "
             f"{', '.join(config.rewards)}; {len(held_out)} held-out prompts. Machine: {machine}.", "",
             "| held-out metric | before | after |", "| --- | --- | --- |"]
    lines += [f"| {key} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |" for key in sorted(set(before) | set(after))]
    generate = sum(r["generate_s"] for r in rows) / len(rows) if rows else None
    step_seconds = result.elapsed_seconds / max(result.step, 1)
    lines += ["", f"{result.step} steps in {result.elapsed_seconds:.0f} s (evaluations included), {total_seconds:.0f} s in "
              f"all; rollout generation {_fmt(generate)} s per generation.", ""]
    keys = [key for key in ("reward", "accuracy", "frac_reward_zero_std", "kl", "kl_coef", "clip_ratio", "entropy",
                            "completion_length", "value_loss") if any(key in row for row in step_rows)]
    if keys:
        lines += ["| training figure | first logged | last logged |", "| --- | --- | --- |"]
        for key in keys:
            logged = [row[key] for row in step_rows if key in row]
            lines.append(f"| {key} | {_fmt(logged[0])} | {_fmt(logged[-1])} |")
        lines.append("")
    lines += ["![curves](curves.png)", "", "## Held-out answers", ""]
    start, end = evaluation.answers.get(0), evaluation.answers.get(result.step)
    for index, prompt in enumerate(evaluation.prompts[:3] if end is not None else []):
        lines += [f"**Prompt {index + 1}:** {_inline(prompt.text, 400)}", "", f"- reference: {_inline(prompt.answer or '', 200)}"]
        if start is not None:
            lines.append(f"- before: {_inline(start[index], 300)}")
        lines += [f"- after: {_inline(end[index], 300)}", ""]
    lines += ["## Resolved config", "", "```yaml", yaml.safe_dump(to_dict(config), sort_keys=False).strip(), "```", ""]
    report = run_dir / "report.md"
    write_text_atomic(report, "\n".join(lines))
    write_json_atomic(run_dir / "report.json", {"before": before, "after": after, "steps": result.step,
                                                "train_seconds": round(result.elapsed_seconds, 1),
                                                "seconds_per_step": round(step_seconds, 2),
                                                "generate_seconds": generate, "total_seconds": round(total_seconds, 1),
                                                "machine": machine,
                                                "answers": {str(k): v for k, v in evaluation.answers.items()}})
    return report
