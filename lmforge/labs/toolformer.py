"""Toolformer (Schick et al., 2023) on a laptop: a model labels its own data with calculator calls,
keeps the calls that help it predict what follows, and is fine-tuned on them.

    result = run_toolformer(load_toolformer_config("toolformer-smollm2"))

For each training text (a reasoning-gym question and its reference answer, as a chat):
  1. positions: where in the answer the model itself most expects a call, p("[" | prefix) (top `positions`);
  2. calls: `samples` calls sampled there, from the prompt `... [calculator(` (the engine, batched);
  3. execution: the calculator runs each expression (failed calls are dropped);
  4. the filter: with the answer's tokens after the position x_i.. and Toolformer's weights
     w_t = max(0, 1 - 0.2 t), L(prefix) is the weighted loss of x_i.. after `prefix`:
         L+ = L(call with its result)       L- = min(L(no call), L(call with an empty result))
     a call is kept when L- - L+ >= tau (the result made the answer more likely by tau nats);
  5. fine-tuning: the texts with their kept calls, through `lmforge sft` (the one Trainer).

The lab measures held-out accuracy without tools, with tools at inference only (the tool prompt
and its example, no training), and after the fine-tuning, and writes report.md / report.json /
accuracy.png to out_dir/name.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import build_config
from ..errors import UserError
from .common import new_lab_dir

CALL = "[calculator("
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class ToolformerConfig:
    name: str = "toolformer-lab"
    out_dir: str = "runs"
    model: str = "smollm2-135m-instruct"
    data: str = "reasoning-gym:products?min_terms=2&max_terms=2&min_digits=2&max_digits=3"
    train_problems: int = 96        # texts the model annotates
    eval_problems: int = 48         # held-out questions (another seed, overlap removed)
    positions: int = 1              # candidate positions per text (highest p("["))
    samples: int = 3                # calls sampled per position
    sample_temperature: float = 0.7
    tau: float = 1.0                # the filter's threshold (nats), Toolformer's tau_f
    sft_steps: int = 30
    sft_lr: float = 1e-4
    sft_batch_size: int = 4
    answer_tokens: int = 40
    batch_size: int = 16            # generation and loss batches
    seed: int = 0
    threads: int | None = None

    def validate(self) -> "ToolformerConfig":
        for name in ("train_problems", "eval_problems", "positions", "samples", "sft_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, not {getattr(self, name)}; fix the config")
        return self


def load_toolformer_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> ToolformerConfig:
    if recipe is not None and not Path(recipe).exists() and (CONFIGS / f"{recipe}.yaml").exists():
        recipe = CONFIGS / f"{recipe}.yaml"
    return build_config(ToolformerConfig, recipe, overrides).validate()


# ----------------------------------------------------------------------------- the filter (pure)

def toolformer_weights(length: int) -> torch.Tensor:
    """Toolformer's weights of the tokens after a call, w_t = max(0, 1 - 0.2 t), normalised. [length]"""
    weights = (1.0 - 0.2 * torch.arange(length, dtype=torch.float32)).clamp(min=0.0)
    return weights / weights.sum().clamp(min=1e-9)


def weighted_continuation_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] predicting targets [B, T]; weights [B, T] (0 = not scored) -> loss [B]."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")   # [B, T]
    return (nll * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def keep_calls(loss_plain: torch.Tensor, loss_empty: torch.Tensor, loss_result: torch.Tensor,
               tau: float) -> torch.Tensor:
    """Toolformer's filter: keep a call when L- - L+ >= tau, L- = min(no call, call without result). [N] bool"""
    return torch.minimum(loss_plain, loss_empty) - loss_result >= tau


def continuation_losses(model: torch.nn.Module, prefixes: list[list[int]], continuations: list[list[int]],
                        batch_size: int = 16) -> torch.Tensor:
    """The weighted loss of each continuation after its prefix (right-padded batches, no grad). [N]"""
    device = next(model.parameters()).device
    losses = []
    for start in range(0, len(prefixes), batch_size):
        rows = [p + c for p, c in zip(prefixes[start:start + batch_size], continuations[start:start + batch_size])]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.zeros_like(ids)
        weights = torch.zeros(len(rows), width)
        for index, (prefix, cont) in enumerate(zip(prefixes[start:start + batch_size],
                                                  continuations[start:start + batch_size])):
            row = prefix + cont
            ids[index, :len(row)] = torch.tensor(row)
            mask[index, :len(row)] = 1
            # Position t predicts token t + 1: the continuation is predicted from len(prefix) - 1 on.
            first = len(prefix) - 1
            targets[index, first:first + len(cont)] = torch.tensor(cont)
            weights[index, first:first + len(cont)] = toolformer_weights(len(cont))
        scored = weights > 0
        with torch.no_grad():   # logits at the scored positions only ([N, V], not [B, T, V])
            logits = model(ids.to(device), attention_mask=mask.to(device), logits_mask=scored.to(device))
        nll = torch.zeros(len(rows), width)
        nll[scored] = F.cross_entropy(logits.float(), targets.to(device)[scored.to(device)], reduction="none").cpu()
        losses.append((nll * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9))
    return torch.cat(losses)


# ----------------------------------------------------------------------------- the lab

@dataclass
class Problem:
    question: str
    answer: str
    meta: dict


def problems(config: ToolformerConfig) -> tuple[list[Problem], list[Problem]]:
    """(training texts, held-out questions) from the config's reasoning-gym task."""
    from ..data.chat_corpora import parse_reasoning_gym_name, reasoning_gym_conversations

    if not config.data.startswith(("reasoning-gym:", "reasoning_gym:")):
        raise UserError(f"data={config.data!r}: the lab needs a reasoning-gym task (reasoning-gym:TASK?...)")
    task, _, _, options = parse_reasoning_gym_name(config.data)

    def load(size: int, seed: int) -> list[Problem]:
        conversations = reasoning_gym_conversations(task, size, seed, options=options)
        return [Problem(c.messages[0]["content"], c.messages[1]["content"], c.meta) for c in conversations]

    train = load(config.train_problems, config.seed)
    seen = {p.question for p in train}
    held_out = [p for p in load(config.eval_problems * 2, config.seed + 1000) if p.question not in seen]
    return train, held_out[:config.eval_problems]


def final_answer(text: str) -> str:
    """The last number of a reply, tool calls read as their results ('[calculator(2*3)→ 6]' -> '6')."""
    text = re.sub(r"\[\w+\([^\]]*?→\s*([^\]]*)\]", r" \1 ", text)
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return numbers[-1] if numbers else text.strip()


def accuracy(problems_: list[Problem], replies: list[str]) -> float:
    from ..data.chat_corpora import score_answer

    return sum(score_answer(p.meta, final_answer(r)) for p, r in zip(problems_, replies)) / max(1, len(problems_))


# The one demonstration that "tools at inference only" shows an untrained model.
DEMONSTRATION = [{"role": "user", "content": "What is 12 * 23?"},
                 {"role": "assistant", "content": "[calculator(12*23)→ 276] 276"}]


def _prompt(tokenizer: Any, question: str, system: str | None, shot: bool = False) -> list[int]:
    from ..tokenizer.chat_template import render_chat_ids

    messages = ([{"role": "system", "content": system}] if system else []) + (DEMONSTRATION if shot else []) + \
        [{"role": "user", "content": question}]
    return render_chat_ids(tokenizer, messages, add_generation_prompt=True)[0]


def annotate(config: ToolformerConfig, engine: Any, registry: Any, train: list[Problem]) -> tuple[list[dict], dict]:
    """Steps 1-4 for every training text: (kept examples with their calls, counts)."""
    from ..infer.sampling import SamplingParams

    model, tokenizer = engine.model, engine.tokenizer
    system = registry.describe()
    open_id = tokenizer.encode(" [", allow_special=False)[-1:] + tokenizer.encode("[", allow_special=False)[:1]
    prompts = [_prompt(tokenizer, p.question, system) for p in train]
    answers = [tokenizer.encode(p.answer, allow_special=False) for p in train]
    # 1. positions: p("[" or " [") before each answer token, from one forward per text.
    candidates = []   # (problem index, position in answer tokens)
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
        where = torch.zeros(1, len(prompt) + len(answer), dtype=torch.bool, device=engine.device)
        where[0, len(prompt) - 1:-1] = True        # the positions before each answer token
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer], device=engine.device), logits_mask=where)
        probability = logits.float().softmax(-1)[:, sorted(set(open_id))].sum(-1)       # [len(answer)]
        for position in probability.topk(min(config.positions, len(answer))).indices.tolist():
            candidates.append((index, position))
    # 2. calls sampled at each position, batched through the engine.
    sample_prompts, owners = [], []
    for index, position in candidates:
        prefix = tokenizer.decode(answers[index][:position])
        ids = prompts[index] + tokenizer.encode(prefix + CALL, allow_special=False)
        for _ in range(config.samples):
            sample_prompts.append(ids)
            owners.append((index, position, prefix))
    params = SamplingParams(max_new_tokens=24, temperature=config.sample_temperature, top_p=0.95,
                            stop=[")", "→", "\n"], seed=config.seed)
    texts = [r.text for r in _generate_seeded(engine, sample_prompts, params)]
    # 3. execution (a failing call is dropped), one call per distinct expression and position.
    calls, seen = [], set()
    for (index, position, prefix), expression in zip(owners, texts):
        expression = expression.strip()
        if not expression or (index, position, expression) in seen:
            continue
        seen.add((index, position, expression))
        call = registry.run(f"{CALL}{expression})")
        if call.error is None:
            calls.append((index, position, prefix, expression, call.result))
    # 4. the filter: three losses per call, for the answer tokens after the position.
    plain, empty, full, rests = [], [], [], []
    for index, position, prefix, expression, result in calls:
        rest = answers[index][position:]
        head = prompts[index] + tokenizer.encode(prefix, allow_special=False)
        call_text = f"{CALL}{expression})→"
        plain.append(head)
        # The inserted text ends with "] " as in the fine-tuning data ("...→ 51465] 51465"): without
        # that space the answer's digits would be scored where the model expects " " (a lower gain).
        empty.append(head + tokenizer.encode(call_text + " ] ", allow_special=False))
        full.append(head + tokenizer.encode(f"{call_text} {result}] ", allow_special=False))
        rests.append(rest)
    if not calls:
        return [], {"texts": len(train), "positions": len(candidates), "sampled": len(texts), "executed": 0, "kept": 0}
    loss_plain = continuation_losses(model, plain, rests, config.batch_size)
    loss_empty = continuation_losses(model, empty, rests, config.batch_size)
    loss_full = continuation_losses(model, full, rests, config.batch_size)
    keep = keep_calls(loss_plain, loss_empty, loss_full, config.tau)
    best: dict[int, tuple[float, dict]] = {}   # the most useful kept call per text
    for (index, position, prefix, expression, result), kept, lp, le, lf in zip(
            calls, keep.tolist(), loss_plain.tolist(), loss_empty.tolist(), loss_full.tolist()):
        if not kept:
            continue
        gain = min(lp, le) - lf
        reply = f"{prefix}{CALL}{expression})→ {result}] {train[index].answer[len(prefix):]}"
        example = {"messages": [{"role": "system", "content": system},
                                {"role": "user", "content": train[index].question},
                                {"role": "assistant", "content": reply}],
                   "gain": round(gain, 3)}
        if index not in best or gain > best[index][0]:
            best[index] = (gain, example)
    counts = {"texts": len(train), "positions": len(candidates), "sampled": len(texts), "executed": len(calls),
              "kept": int(keep.sum()), "texts_with_a_kept_call": len(best),
              "mean_gain_kept": float((torch.minimum(loss_plain, loss_empty) - loss_full)[keep].mean())
              if keep.any() else None}
    return [example for _, example in best.values()], counts


def _generate_seeded(engine: Any, prompts: list[list[int]], params: Any) -> list[Any]:
    """engine.generate with a different seed per prompt (identical prompts give different samples)."""
    import dataclasses

    sequences = [engine.submit(p, dataclasses.replace(params, seed=params.seed + i)) for i, p in enumerate(prompts)]
    try:
        while not all(s.finished for s in sequences):
            engine.step()
    finally:
        for sequence in sequences:
            engine.cancel(sequence)
    return [s.result() for s in sequences]


def evaluate(engine: Any, registry: Any, held_out: list[Problem], system: str | None, answer_tokens: int,
             shot: bool = False) -> tuple[float, list[str], int]:
    """(accuracy, replies, calls made): greedy; through the tool loop when `registry` is given."""
    from ..infer.sampling import SamplingParams
    from ..infer.tools import ToolLoop

    prompts = [_prompt(engine.tokenizer, p.question, system, shot) for p in held_out]
    params = SamplingParams(max_new_tokens=answer_tokens)
    if registry is None:
        replies = [r.text for r in engine.generate(prompts, params)]
        return accuracy(held_out, replies), replies, 0
    results = ToolLoop(engine, registry).generate(prompts, params)
    return accuracy(held_out, [r.text for r in results]), [r.text for r in results], sum(len(r.calls) for r in results)


def run_toolformer(config: ToolformerConfig) -> dict:
    """The whole lab; returns the report's figures (also written to out_dir/name/report.json)."""
    from ..infer.engine import Engine
    from ..infer.tools import ToolRegistry
    from ..io import write_json_atomic
    from ..model.loading import load
    from ..train.sft import load_sft_config, sft

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    out = new_lab_dir(config.out_dir, config.name)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    registry = ToolRegistry.builtin("calculator")
    train, held_out = problems(config)
    model, tokenizer = load(config.model)
    engine = Engine(model.eval(), tokenizer, max_batch_size=config.batch_size)

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        print(f"[toolformer] {name}: {timings[name]}s", file=sys.stderr)

    base_acc, base_replies, _ = evaluate(engine, None, held_out, None, config.answer_tokens)
    lap("eval without tools")
    tools_acc, tools_replies, tools_calls = evaluate(engine, registry, held_out, registry.describe(),
                                                     config.answer_tokens, shot=True)
    lap("eval with tools at inference")
    examples, counts = annotate(config, engine, registry, train)
    lap("annotate and filter")
    data_path = out / "toolformer-data.jsonl"
    with open(data_path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"messages": example["messages"]}, ensure_ascii=False) + "\n")
    tuned = {"accuracy": None, "calls": None, "run_dir": None, "note": None}
    val = 2
    if len(examples) < val + 2:
        tuned["note"] = f"only {len(examples)} calls passed the filter (tau={config.tau}); too few to fine-tune"
    else:
        overrides = [f"model={config.model}", f"data={data_path}", "format=messages", f"name={config.name}-sft",
                     f"out_dir={out}", f"max_steps={config.sft_steps}", f"lr={config.sft_lr}",
                     f"batch_size={config.sft_batch_size}", f"val_examples={val}", "eval_prompts=0",
                     "sample_count=0", "eval_at_start=false", "seq_len=256", "warmup_steps=3",
                     f"eval_interval={config.sft_steps}", f"checkpoint_interval={config.sft_steps}",
                     "progress=false", f"seed={config.seed}"]
        result = sft(load_sft_config(None, overrides))
        lap("fine-tune (lmforge sft)")
        tuned_model, _ = load(str(result.run_dir))
        tuned_engine = Engine(tuned_model.eval(), tokenizer, max_batch_size=config.batch_size)
        accuracy_, replies, calls = evaluate(tuned_engine, registry, held_out, registry.describe(),
                                             config.answer_tokens)
        lap("eval after fine-tuning")
        tuned.update(accuracy=accuracy_, calls=calls, run_dir=str(result.run_dir), samples=replies[:3])
    report = {"config": asdict(config), "held_out": len(held_out), "accuracy_without_tools": base_acc,
              "accuracy_tools_at_inference": tools_acc, "calls_at_inference": tools_calls,
              "accuracy_after_toolformer": tuned["accuracy"], "calls_after_toolformer": tuned["calls"],
              "filter": counts, "sft_run": tuned["run_dir"], "note": tuned["note"], "seconds": timings,
              "total_seconds": round(time.perf_counter() - started, 1),
              "samples": {"without_tools": base_replies[:3], "tools_at_inference": tools_replies[:3],
                          "after_toolformer": tuned.get("samples")}}
    write_json_atomic(out / "report.json", report)
    _write_report(out, report)
    return report


def _write_report(out: Path, report: dict) -> None:
    from ..io import atomic_open
    from ..train.sft_eval import cpu_description

    rows = [("without tools", report["accuracy_without_tools"]),
            ("tools at inference only", report["accuracy_tools_at_inference"]),
            ("after Toolformer fine-tuning", report["accuracy_after_toolformer"])]
    counts = report["filter"]
    lines = [f"# Toolformer lab: {report['config']['model']} on {report['config']['data']}", "",
             f"{report['held_out']} held-out questions, greedy, scored by reasoning-gym's scorer on the reply's "
             "last number (a tool call counts as its result).", "",
             "| condition | accuracy |", "|---|---|"]
    lines += [f"| {name} | {'n/a' if value is None else f'{value:.1%}'} |" for name, value in rows]
    lines += ["", f"Filter (tau = {report['config']['tau']}): {counts.get('texts')} texts, {counts.get('positions')} "
              f"positions, {counts.get('sampled')} sampled calls, {counts.get('executed')} executed, "
              f"**{counts.get('kept')} kept** ({counts.get('texts_with_a_kept_call', 0)} texts with a kept call).",
              f"Calls made on the held-out set: {report['calls_at_inference']} with tools at inference, "
              f"{report['calls_after_toolformer']} after fine-tuning.", ""]
    if report["note"]:
        lines += [f"Note: {report['note']}.", ""]
    lines += [f"Time: {report['total_seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in report['seconds'].items())}) "
              f"on {cpu_description()}.", "", "![accuracy](accuracy.png)", ""]
    with atomic_open(out / "report.md", "w") as handle:
        handle.write("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2))
    values = [0.0 if value is None else value for _, value in rows]
    axis.bar([name.replace(" ", "\n", 1) for name, _ in rows], values, color=["#999", "#69c", "#36a"])
    for x, value in enumerate(values):
        axis.text(x, value + 0.01, f"{value:.0%}", ha="center")
    axis.set_ylabel("held-out accuracy")
    axis.set_ylim(0, max(0.1, max(values) * 1.25))
    axis.set_title(f"Toolformer: {counts.get('kept')} of {counts.get('executed')} calls kept")
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=120)
    plt.close(figure)
