"""`dpo(config)`: the DPO family on preference pairs, through the one Trainer.

    from lmforge.align.dpo import dpo, load_dpo_config
    result = dpo(load_dpo_config("dpo-smollm2-countdown", ["max_steps=20"]))

The pairs file (align/data.py) is split into training and held-out pairs by the seed. Every
evaluation measures the objective on the held-out pairs (val_loss, val_reward_accuracy: the share
of held-out pairs whose implicit reward r = beta log pi/ref ranks chosen above rejected,
val_reward_margin) and, with `eval_task` (a reasoning-gym name whose prompts the pairs did not
come from), greedy answers to its prompts scored by the task: val_answer_accuracy before and after.
The run directory is like SFT's (config.yaml, metrics.jsonl, samples, checkpoints, report.md,
curves.png, the exported model; LoRA exports the merged model).
"""
from __future__ import annotations

import copy
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import build_config, to_dict
from ..errors import UserError
from ..peft.lora import LoRAConfig
from ..train.config import TrainConfig
from ..train.loop import RunResult, Trainer
from ..train.session import RunSession
from .preference import LossType


@dataclass
class DPOConfig(TrainConfig):
    """Preference optimisation (TrainConfig's keys plus these)."""

    name: str = "dpo"
    model: str = "smollm2-135m-instruct"   # the starting policy: any lmforge.load reference
    reference: str | None = None          # default: a frozen copy of `model`, or the base with adapters off (LoRA)
    tokenizer: str | None = None
    pairs: str = "pairs.jsonl"            # JSONL prompt/chosen/rejected (align/data.py)
    max_pairs: int | None = None
    val_pairs: int = 32                   # held out from the pair file
    seq_len: int = 512                    # pairs with a longer side are dropped (counted)
    loss_type: LossType = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0          # robust (and simpo's conservative form)
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0         # kto
    undesirable_weight: float = 1.0
    eval_task: str | None = None          # reasoning-gym:TASK?... whose greedy answers are scored
    eval_prompts: int = 32
    answer_tokens: int = 64
    sample_count: int = 2
    lr: float = 5e-6
    min_lr: float = 5e-7
    warmup_steps: int = 5
    weight_decay: float = 0.0
    batch_size: int = 4                   # pairs per micro-batch (2 x rows)
    max_steps: int | None = 100
    eval_interval: int = 50
    checkpoint_interval: int = 50
    log_interval: int = 5
    precision: str = "auto"
    eval_at_start: bool = True
    peft: str = "none"                    # none | lora (lora.* as for sft)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> "DPOConfig":
        super().validate()
        checks = [
            (self.beta > 0, f"beta must be positive, not {self.beta}"),
            (0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), not {self.label_smoothing}"),
            (self.val_pairs >= 1, "val_pairs must be at least 1"),
            (self.seq_len >= 8, f"seq_len must be at least 8, not {self.seq_len}"),
            (self.peft in ("none", "lora"), f"peft must be none or lora, not {self.peft!r}"),
            (self.answer_tokens >= 1 and self.eval_prompts >= 0, "answer_tokens >= 1 and eval_prompts >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message}; fix the config")
        if self.peft == "lora":
            self.lora.validate()
        return self


def load_dpo_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> DPOConfig:
    return build_config(DPOConfig, recipe, overrides)


@dataclass
class PairData:
    train: Any
    val: Any
    prompts: list[Any]                    # held-out scored conversations (eval_task)
    pairs: int
    dropped: int


def prepare_pair_data(config: DPOConfig, tokenizer: Any, rank: int, world_size: int) -> PairData:
    from .data import PairBatches, pad_id_of, read_pairs, tokenize_pairs

    pairs = read_pairs(config.pairs, config.max_pairs)
    if len(pairs) < config.val_pairs + config.batch_size * world_size:
        raise UserError(f"pair file '{config.pairs}' has {len(pairs)} pairs, too few for val_pairs={config.val_pairs} "
                        f"and one batch of {config.batch_size} x {world_size}; lower val_pairs or add pairs")
    tokenized, dropped = tokenize_pairs(pairs, tokenizer, config.seq_len)
    order = list(range(len(tokenized)))
    random.Random(config.seed).shuffle(order)
    held_out = sorted(order[:config.val_pairs])
    common = dict(pad_id=pad_id_of(tokenizer), seed=config.seed, rank=rank, world_size=world_size)
    train = PairBatches([tokenized[i] for i in sorted(order[config.val_pairs:])], config.batch_size, **common)
    val = PairBatches([tokenized[i] for i in held_out], config.batch_size, shuffle=False, **common) \
        if len(held_out) >= config.batch_size * world_size else None
    if val is None:
        raise UserError(f"{len(held_out)} held-out pairs are fewer than one batch; raise val_pairs")
    prompts = []
    if config.eval_task and config.eval_prompts:
        from ..data.chat_corpora import builtin_conversations

        prompts = builtin_conversations(config.eval_task)[:config.eval_prompts]
    return PairData(train, val, prompts, len(pairs), dropped)


def check_same_vocabulary(model: Any, tokenizer: Any, reference: Any, reference_tokenizer: Any, name: str) -> None:
    """A reference scoring other token ids would make every log-ratio meaningless: refuse it."""
    ours, theirs = model.config.vocab_size, reference.config.vocab_size
    same_tokenizer = reference_tokenizer is None or reference_tokenizer.fingerprint() == tokenizer.fingerprint()
    if ours != theirs or not same_tokenizer:
        raise UserError(f"reference '{name}' has another vocabulary ({theirs} tokens"
                        f"{'' if same_tokenizer else ', a different tokenizer'}; the policy has {ours}); "
                        "the reference must share the policy's tokenizer (use the policy's starting model)")


class PreferenceEvaluation:
    """The Trainer's evaluate callable: the objective on held-out pairs, and scored answers."""

    def __init__(self, config: Any, tokenizer: Any, data: PairData, objective: Any, context: Any) -> None:
        self.config, self.tokenizer, self.data, self.objective, self.context = config, tokenizer, data, objective, context
        self.trainer: Any = None
        self.answers: dict[int, list[str]] = {}
        self.metrics: dict[int, dict[str, float]] = {}

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        from ..eval import evaluate_objective

        step = self.trainer.step if self.trainer is not None else 0
        metrics = evaluate_objective(model, self.objective, self.data.val.iter_fixed(), device=self.context.device,
                                     reduce=self.context.all_reduce_sum, ctx=self.trainer.ctx)
        metrics.pop("val_ppl", None)       # a preference loss has no perplexity reading
        if self.data.prompts:
            answers = answer_prompts(model, self.tokenizer, [c.messages[:-1] for c in self.data.prompts],
                                     self.config.answer_tokens)
            from ..data.chat_corpora import score_answer

            scores = [score_answer(c.meta, a) for c, a in zip(self.data.prompts, answers)]
            metrics["val_answer_accuracy"] = sum(scores) / len(scores)
            self.answers[step] = answers
            for conversation, answer in list(zip(self.data.prompts, answers))[:self.config.sample_count]:
                text = f"{conversation.messages[-2]['content']}\n--> {answer or '(empty reply)'}"
                if self.trainer.tracker is not None:
                    self.trainer.tracker.log_text(step, "sample", text)
        self.metrics[step] = dict(metrics)
        return metrics


def answer_prompts(model: torch.nn.Module, tokenizer: Any, prompts: list[list[dict[str, str]]],
                   max_new_tokens: int) -> list[str]:
    """Greedy replies (chat template), batched in the engine; a fixed seed."""
    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams
    from ..tokenizer.chat_template import render_chat_ids

    ids = [render_chat_ids(tokenizer, messages, add_generation_prompt=True)[0] for messages in prompts]
    engine = Engine(model, tokenizer, max_batch_size=min(16, len(ids)),
                    max_seq_len=min(model.config.max_seq_len, max(map(len, ids)) + max_new_tokens),
                    context_policy="error")
    return [r.text for r in engine.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                                  seed=0))]


def dpo(config: DPOConfig, resume: bool = False) -> RunResult:
    """Train config.model on config.pairs with config.loss_type; `resume` continues the run."""
    from ..model.loading import load
    from ..train.sft import _with_adapters, load_causal_lm
    from .preference import PreferenceObjective

    config.validate()
    with RunSession(config, resume) as session:
        context = session.context
        config = session.with_precision(config)
        model, tokenizer = load_causal_lm(config.model, config.tokenizer, config.seed)
        if getattr(model.config, "arch", "gpt") != "gpt":
            raise UserError(f"model '{config.model}' is a BERT; preference optimisation needs a causal LM (a GPT)")
        model = merged_if_adapted(model, config)
        objective = PreferenceObjective(config.loss_type, config.beta, config.label_smoothing, config.simpo_gamma,
                                        config.desirable_weight, config.undesirable_weight)
        frozen: dict[str, torch.nn.Module] = {}
        if objective.needs_reference:
            if config.reference is not None:
                reference, reference_tokenizer = load(config.reference)
                check_same_vocabulary(model, tokenizer, reference, reference_tokenizer, config.reference)
                frozen["reference"] = reference.float()
            elif config.peft == "none":
                frozen["reference"] = copy.deepcopy(model).float()     # LoRA: the base with adapters off instead
        started = time.perf_counter()
        data = prepare_pair_data(config, tokenizer, context.rank, context.world_size)
        resume_from, config_dict, tracker, progress = session.open_run(config, tokenizer)
        evaluation = PreferenceEvaluation(config, tokenizer, data, objective, context)
        model, adapters = _with_adapters(model.float(), config)
        trainer = Trainer(model, objective, data.train, config, run_dir=session.run_dir, context=context,
                          evaluate=evaluation, tracker=tracker, progress=progress, frozen_models=frozen,
                          config_dict=config_dict, **adapters)
        evaluation.trainer = trainer
        if context.is_main:
            print(f"{config.loss_type} on {config.pairs}: {data.pairs} pairs ({data.dropped} longer than seq_len "
                  f"dropped), {len(data.train.pairs)} train, {len(data.val.pairs)} held out; reference: "
                  f"{describe_reference(config, objective)} -> {config.run_dir}", file=sys.stderr)
        result = session.fit(trainer, resume_from)
        if context.is_main:
            report = write_preference_report(config, data, evaluation, result, time.perf_counter() - started,
                                             title=f"{config.loss_type.upper()} report")
            print(f"report: {report}")
        return result


def merged_if_adapted(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    """A starting model that carries LoRA adapters (a LoRA SFT run) is merged first: it is the
    model being aligned (and, with peft=lora, the reference the new adapters are measured from)."""
    from ..peft.lora import has_lora, unload_lora

    if not has_lora(model):
        return model
    model = unload_lora(model, merge=True)
    for parameter in model.parameters():       # a plain model again: every weight trainable
        parameter.requires_grad_(True)
    return model


def describe_reference(config: DPOConfig, objective: Any) -> str:
    if not objective.needs_reference:
        return f"none ({config.loss_type} is reference-free)"
    if config.reference:
        return config.reference
    return "the base with LoRA adapters off" if config.peft == "lora" else f"a frozen copy of {config.model}"


def write_preference_report(config: Any, data: PairData, evaluation: PreferenceEvaluation, result: RunResult,
                            total_seconds: float, title: str) -> Path:
    """runs/<name>/report.md + report.json + curves.png: before/after on held-out pairs and prompts."""
    import yaml

    from ..io import write_json_atomic, write_text_atomic
    from ..track import plot_runs
    from ..train.sft_eval import _fmt, _inline, cpu_description

    run_dir = Path(result.run_dir)
    before = evaluation.metrics.get(0, {})
    after = evaluation.metrics.get(result.step, result.eval_metrics)
    rows = [row for row in result.history if "tokens_per_s" in row]
    tokens_per_s = sum(r["tokens_per_s"] for r in rows) / len(rows) if rows else None
    machine = f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    plot_runs([run_dir], run_dir / "curves.png", title=f"{title}: {config.model}")
    lines = [f"# {title}: {run_dir.name}", "", f"`{config.model}` on `{config.pairs}` ({len(data.train.pairs)} training "
             f"pairs, {len(data.val.pairs)} held out). Machine: {machine}.", "",
             "| metric | before | after |", "| --- | --- | --- |"]
    lines += [f"| {key} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |" for key in sorted(set(before) | set(after))]
    lines += ["", f"{result.step} steps, {result.tokens:,} tokens, {_fmt(tokens_per_s)} tokens/s; {result.elapsed_seconds:.0f} s "
              f"training (evaluations included), {total_seconds:.0f} s in all.", "", "![curves](curves.png)", ""]
    first, last = evaluation.answers.get(0), evaluation.answers.get(result.step)
    if data.prompts and last is not None:
        lines += [f"## Held-out answers ({config.eval_task})", ""]
        for index, conversation in enumerate(data.prompts[:3]):
            lines += [f"**Prompt {index + 1}:** {_inline(conversation.messages[-2]['content'], 400)}", "",
                      f"- reference: {_inline(conversation.messages[-1]['content'], 200)}"]
            if first is not None:
                lines.append(f"- before: {_inline(first[index], 300)}")
            lines += [f"- after: {_inline(last[index], 300)}", ""]
    lines += ["## Resolved config", "", "```yaml", yaml.safe_dump(to_dict(config), sort_keys=False).strip(), "```", ""]
    report = run_dir / "report.md"
    write_text_atomic(report, "\n".join(lines))
    write_json_atomic(run_dir / "report.json", {"before": before, "after": after, "steps": result.step,
                                                "train_seconds": round(result.elapsed_seconds, 1),
                                                "total_seconds": round(total_seconds, 1), "tokens_per_s": tokens_per_s,
                                                "machine": machine,
                                                "answers": {str(k): v for k, v in evaluation.answers.items()}})
    return report
