"""MetaICL (Min et al., 2022) on a laptop: meta-train a model on k-shot episodes of many tasks, so
that it learns *to learn from examples in its context*, and test that on tasks it never saw.

    report = run_metaicl(load_metaicl_config("metaicl-smollm2"))

An episode of a task family is k demonstrations and a query, all from that family, as one chat:

    user:      Q: <question 1>\\nA: <answer 1>\\n\\n ... Q: <question k>\\nA: <answer k>\\n\\nQ: <query>\\nA:
    assistant: <the query's answer>          (the only tokens trained on, as in MetaICL)

Three models are compared on the held-out families at k = 0, 1, 4, 8 (the paper's baselines):
the base model (no meta-training), MetaICL (fine-tuned on k-shot episodes of the training
families) and plain multi-task SFT (the same families and number of examples, 0-shot). Both
fine-tunings go through `lmforge sft` (the one Trainer) on JSONL written here. The report is
out_dir/name/report.md, report.json and accuracy_vs_k.png.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import build_config
from ..errors import UserError
from .common import new_lab_dir

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class MetaICLConfig:
    name: str = "metaicl-lab"
    out_dir: str = "runs"
    model: str = "smollm2-135m-instruct"
    train_tasks: list[str] = field(default_factory=lambda: [
        "chain_sum", "products", "base_conversion", "caesar_cipher", "number_sorting", "word_sorting",
        "leg_counting", "fraction_simplification", "power_function", "decimal_arithmetic"])
    eval_tasks: list[str] = field(default_factory=lambda: ["gcd", "lcm", "letter_counting", "spell_backward"])
    pool: int = 40                  # entries drawn per task (demonstrations and queries come from them)
    train_episodes: int = 240       # meta-training episodes (spread over train_tasks)
    train_k: int = 4                # demonstrations per meta-training episode
    eval_queries: int = 10          # queries per held-out task
    shots: list[int] = field(default_factory=lambda: [0, 1, 4, 8])
    sft_steps: int = 40
    sft_lr: float = 5e-5
    sft_batch_size: int = 4
    seq_len: int = 768
    answer_tokens: int = 24
    batch_size: int = 16
    seed: int = 0
    threads: int | None = None

    def validate(self) -> "MetaICLConfig":
        overlap = set(self.train_tasks) & set(self.eval_tasks)
        if overlap:
            raise UserError(f"train_tasks and eval_tasks share {sorted(overlap)}; held-out families must be "
                            "unseen in meta-training")
        if not self.train_tasks or not self.eval_tasks:
            raise UserError("train_tasks and eval_tasks must each name at least one reasoning-gym task")
        if any(k < 0 for k in self.shots) or self.train_k < 0:
            raise UserError("shots and train_k must be >= 0")
        if self.pool < max(self.shots + [self.train_k]) + 2:
            raise UserError(f"pool={self.pool} is too small for {max(self.shots + [self.train_k])} demonstrations "
                            "plus queries; raise pool")
        return self


def load_metaicl_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> MetaICLConfig:
    if recipe is not None and not Path(recipe).exists() and (CONFIGS / f"{recipe}.yaml").exists():
        recipe = CONFIGS / f"{recipe}.yaml"
    return build_config(MetaICLConfig, recipe, overrides).validate()


# ----------------------------------------------------------------------------- episodes

@dataclass
class Entry:
    question: str
    answer: str
    meta: dict


def episode_text(demonstrations: list[Entry], query: Entry) -> str:
    """The user message of an episode: k solved examples, then the query (MetaICL's concatenation)."""
    parts = [f"Q: {d.question}\nA: {d.answer}" for d in demonstrations]
    return "\n\n".join(parts + [f"Q: {query.question}\nA:"])


def build_episode(entries: list[Entry], query_index: int, k: int, rng: random.Random) -> tuple[list[Entry], Entry]:
    """(k demonstrations drawn from `entries` without the query, the query). Deterministic for an rng state."""
    if k > len(entries) - 1:
        raise UserError(f"{k} demonstrations need at least {k + 1} entries of the task; raise pool")
    others = [entry for index, entry in enumerate(entries) if index != query_index]
    return rng.sample(others, k), entries[query_index]


def episode_messages(demonstrations: list[Entry], query: Entry, with_answer: bool = True) -> list[dict]:
    messages = [{"role": "user", "content": episode_text(demonstrations, query)}]
    if with_answer:
        messages.append({"role": "assistant", "content": query.answer})
    return messages


def task_entries(task: str, size: int, seed: int) -> list[Entry]:
    from ..data.chat_corpora import reasoning_gym_conversations

    return [Entry(c.messages[0]["content"], c.messages[1]["content"], c.meta)
            for c in reasoning_gym_conversations(task, size, seed)]


def meta_training_data(pools: dict[str, list[Entry]], episodes: int, k: int, seed: int) -> list[list[dict]]:
    """MetaICL's training set: `episodes` k-shot episodes, round-robin over the task families."""
    rng = random.Random(seed)
    tasks = sorted(pools)
    data = []
    for index in range(episodes):
        entries = pools[tasks[index % len(tasks)]]
        demonstrations, query = build_episode(entries, rng.randrange(len(entries)), k, rng)
        data.append(episode_messages(demonstrations, query))
    return data


def multitask_data(pools: dict[str, list[Entry]], examples: int, seed: int) -> list[list[dict]]:
    """The multi-task SFT baseline: as many 0-shot examples of the same families."""
    return meta_training_data(pools, examples, 0, seed)


def eval_prompts(entries: list[Entry], queries: int, k: int, seed: int) -> list[tuple[list[dict], Entry]]:
    """(messages, query) for the first `queries` entries as queries, each with k demonstrations of the same
    task. The demonstrations for k are a prefix of those for a larger k (a fair curve over k)."""
    prompts = []
    for query_index in range(min(queries, len(entries))):
        rng = random.Random(seed * 1_000_003 + query_index)
        order = [i for i in range(len(entries)) if i != query_index]
        rng.shuffle(order)
        demonstrations = [entries[i] for i in order[:k]]
        prompts.append((episode_messages(demonstrations, entries[query_index], with_answer=False),
                        entries[query_index]))
    return prompts


# ----------------------------------------------------------------------------- the lab

def _score(entry: Entry, reply: str) -> float:
    from ..data.chat_corpora import score_answer

    answer = reply.strip().split("\n")[0].strip()
    answer = answer[2:].strip() if answer.startswith("A:") else answer
    return score_answer(entry.meta, answer)


def evaluate(engine: Any, pools: dict[str, list[Entry]], config: MetaICLConfig) -> dict[str, dict[int, float]]:
    """accuracy[task][k] on the held-out tasks, greedy, every (task, k) prompt in one batch per k."""
    from ..infer.sampling import SamplingParams
    from ..tokenizer.chat_template import render_chat_ids

    params = SamplingParams(max_new_tokens=config.answer_tokens, stop=["\n\n", "\nQ:"])
    scores: dict[str, dict[int, float]] = {task: {} for task in pools}
    for k in config.shots:
        batch = [(task, messages, entry) for task, entries in pools.items()
                 for messages, entry in eval_prompts(entries, config.eval_queries, k, config.seed)]
        ids = [render_chat_ids(engine.tokenizer, messages, add_generation_prompt=True)[0] for _, messages, _ in batch]
        replies = [r.text for r in engine.generate(ids, params)]
        for task in pools:
            task_scores = [_score(entry, reply) for (t, _, entry), reply in zip(batch, replies) if t == task]
            scores[task][k] = sum(task_scores) / len(task_scores)
    return scores


def _fine_tune(config: MetaICLConfig, out: Path, name: str, conversations: list[list[dict]]) -> Path:
    from ..train.sft import load_sft_config, sft

    path = out / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for messages in conversations:
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    overrides = [f"model={config.model}", f"data={path}", "format=messages", f"name={name}", f"out_dir={out}",
                 f"max_steps={config.sft_steps}", f"lr={config.sft_lr}", f"batch_size={config.sft_batch_size}",
                 "val_examples=4", "eval_prompts=0", "sample_count=0", "eval_at_start=false",
                 f"seq_len={config.seq_len}", "warmup_steps=3", f"eval_interval={config.sft_steps}",
                 f"checkpoint_interval={config.sft_steps}", "progress=false", f"seed={config.seed}"]
    return sft(load_sft_config(None, overrides)).run_dir


def run_metaicl(config: MetaICLConfig) -> dict:
    import torch

    from ..infer.engine import Engine
    from ..io import write_json_atomic
    from ..model.loading import load

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    out = new_lab_dir(config.out_dir, config.name)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        print(f"[metaicl] {name}: {timings[name]}s", file=sys.stderr)

    train_pools = {task: task_entries(task, config.pool, config.seed) for task in config.train_tasks}
    eval_pools = {task: task_entries(task, config.pool, config.seed + 1) for task in config.eval_tasks}
    lap("tasks")
    results: dict[str, dict] = {}
    model, tokenizer = load(config.model)
    results["no meta-training"] = evaluate(Engine(model.eval(), tokenizer, max_batch_size=config.batch_size),
                                           eval_pools, config)
    lap("eval base")
    runs = {"MetaICL": meta_training_data(train_pools, config.train_episodes, config.train_k, config.seed),
            "multi-task SFT": multitask_data(train_pools, config.train_episodes, config.seed)}
    for label, conversations in runs.items():
        run_dir = _fine_tune(config, out, f"{config.name}-{label.split()[0].lower()}", conversations)
        lap(f"fine-tune {label}")
        tuned, _ = load(str(run_dir))
        results[label] = evaluate(Engine(tuned.eval(), tokenizer, max_batch_size=config.batch_size), eval_pools,
                                  config)
        lap(f"eval {label}")
    mean = {label: {k: sum(scores[t][k] for t in scores) / len(scores) for k in config.shots}
            for label, scores in results.items()}
    report = {"config": asdict(config), "accuracy": results, "mean_accuracy": mean, "seconds": timings,
              "total_seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(out / "report.json", report)
    _write_report(out, report)
    return report


def _write_report(out: Path, report: dict) -> None:
    from ..io import atomic_open
    from ..train.sft_eval import cpu_description

    config, mean = report["config"], report["mean_accuracy"]
    shots = config["shots"]
    lines = [f"# MetaICL lab: {config['model']}", "",
             f"Meta-trained on {len(config['train_tasks'])} reasoning-gym families ({', '.join(config['train_tasks'])}), "
             f"{config['train_episodes']} episodes of k={config['train_k']}; evaluated on held-out families "
             f"({', '.join(config['eval_tasks'])}), {config['eval_queries']} queries each, greedy.", "",
             "Mean held-out accuracy:", "", "| model | " + " | ".join(f"k={k}" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    lines += [f"| {label} | " + " | ".join(f"{values[k]:.1%}" for k in shots) + " |" for label, values in mean.items()]
    lines += ["", "Per task:", "", "| model | task | " + " | ".join(f"k={k}" for k in shots) + " |",
              "|---|---|" + "---|" * len(shots)]
    for label, scores in report["accuracy"].items():
        lines += [f"| {label} | {task} | " + " | ".join(f"{values[k]:.0%}" for k in shots) + " |"
                  for task, values in scores.items()]
    lines += ["", f"Time: {report['total_seconds']:.0f} s on {cpu_description()}.", "",
              "![accuracy against k](accuracy_vs_k.png)", ""]
    with atomic_open(out / "report.md", "w") as handle:
        handle.write("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for label, values in mean.items():
        axis.plot(shots, [values[k] for k in shots], marker="o", label=label)
    axis.set_xticks(shots)
    axis.set_xlabel("demonstrations in the prompt (k)")
    axis.set_ylabel("held-out accuracy")
    axis.set_title("MetaICL on unseen reasoning-gym families")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "accuracy_vs_k.png", dpi=120)
    plt.close(figure)
