"""A task: its documents, how each becomes a prompt, and how the answers are scored.

    task = load_task("mmlu-fewshot")                      # lmforge.eval.task_data
    result = run_task(task, EvalModel.load("smollm2-135m-instruct"), limit=50)
    result.value, result.stderr                           # acc and its bootstrap stderr

Kinds and the requests they make (lmforge.eval.requests):
    multiple_choice  loglikelihood(prompt, " " + choice) for every choice -> acc, acc_norm
    generate         generate_until(prompt) -> extracted answer vs reference -> exact_match (or score);
                     metric "math_verify" compares them symbolically with math-verify (metrics.py)
    code             generate_until(prompt) -> executed against the tests (code_exec) -> pass@1 / pass@k
    perplexity       loglikelihood_rolling(text) -> bits_per_byte

A prompt is: description + k few-shot examples ("query target", separated by a blank line) +
the query. Few-shot examples are drawn with a fixed seed from the task's pool (the same group,
e.g. MMLU subject, when documents have one), never the document itself.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..errors import UserError
from . import metrics as M
from .results import TaskResult

Kind = Literal["multiple_choice", "generate", "code", "perplexity"]


@dataclass
class Task:
    name: str
    kind: Kind
    docs: list[dict[str, Any]]          # query/choices/gold | query/reference[/target] | text | query/problem
    fewshot: list[dict[str, Any]] | None = None   # the few-shot pool (default: the other docs)
    num_fewshot: int = 0
    description: str = ""               # may name "{group}"
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_tokens: int = 256
    extract: str = "none"               # gsm8k | last_number | none | reasoning_gym
    metric: str = "acc"                 # the primary metric (generate: exact_match | math_verify | score)
    chat: bool = False                  # generation prompts go through the chat template

    def target(self, doc: dict[str, Any]) -> str:
        if self.kind == "multiple_choice":
            return " " + doc["choices"][doc["gold"]]
        return doc.get("target", " " + str(doc.get("reference", "")))

    def prompts(self, docs: list[dict[str, Any]], num_fewshot: int, seed: int) -> list[str]:
        pool = self.fewshot if self.fewshot is not None else self.docs
        rng = random.Random(seed)
        out = []
        for doc in docs:
            candidates = [d for d in pool if d is not doc and d.get("group") == doc.get("group")]
            shots = rng.sample(candidates, min(num_fewshot, len(candidates))) if num_fewshot else []
            head = self.description.replace("{group}", str(doc.get("group", "")).replace("_", " "))
            out.append(head + "".join(d["query"] + self.target(d) + "\n\n" for d in shots) + doc["query"])
        return out


def run_task(task: Task, lm: Any, limit: int | None = None, num_fewshot: int | None = None, seed: int = 1234,
             samples: int = 1, temperature: float = 0.8, allow_code_execution: bool = False,
             chat: bool | None = None) -> TaskResult:
    """Evaluate `lm` (an EvalModel) on the task's first `limit` documents."""
    if task.kind == "code" and not allow_code_execution:
        raise UserError(f"the task '{task.name}' runs model-written code; pass --allow-code-execution to allow it "
                        "(it runs sandboxed: time and memory limits, no network)")
    if task.metric == "math_verify":
        M.require_math_verify()                  # before generating, not after
    docs = task.docs[:limit] if limit else task.docs
    if not docs:
        raise UserError(f"the task '{task.name}' has no documents to evaluate (limit={limit})")
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    if shots < 0:
        raise UserError(f"--num-fewshot must be >= 0, not {shots}")
    config: dict[str, Any] = {"num_fewshot": shots if task.kind != "perplexity" else 0, "seed": seed}
    if task.kind == "perplexity":
        values, table = _perplexity(task, lm, docs)
    elif task.kind == "multiple_choice":
        values, table = _multiple_choice(task, lm, docs, task.prompts(docs, shots, seed))
    else:
        use_chat = task.chat if chat is None else chat
        config.update(chat=use_chat, max_tokens=task.max_tokens, samples=samples)
        prompts = task.prompts(docs, shots, seed)
        values, table = _generative(task, lm, docs, prompts, samples, temperature, seed, use_chat,
                                    allow_code_execution)
    primary = task.metric if task.metric in table else next(iter(table))
    return TaskResult(metric=primary, value=table[primary]["value"], stderr=table[primary]["stderr"], n=len(docs),
                      metrics=table, config=config)


def _summary(values: np.ndarray, statistic=None) -> dict[str, float | None]:
    value = float(values.mean()) if statistic is None else statistic(values)
    return {"value": value, "stderr": M.bootstrap_stderr(values, statistic)}


def _multiple_choice(task: Task, lm: Any, docs: list[dict], prompts: list[str]):
    pairs = [(prompt, " " + choice) for prompt, doc in zip(prompts, docs) for choice in doc["choices"]]
    scores = iter(lm.loglikelihood(pairs))
    acc, acc_norm = [], []
    for doc in docs:
        logprobs = [next(scores)[0] for _ in doc["choices"]]
        pick, pick_norm = M.choice_scores(logprobs, [" " + c for c in doc["choices"]])
        acc.append(float(pick == doc["gold"]))
        acc_norm.append(float(pick_norm == doc["gold"]))
    acc_a, norm_a = np.array(acc), np.array(acc_norm)
    return {"acc": acc_a, "acc_norm": norm_a}, {"acc": _summary(acc_a), "acc_norm": _summary(norm_a)}


def _perplexity(task: Task, lm: Any, docs: list[dict]):
    texts = [doc["text"] for doc in docs]
    # Windows of the whole context that overlap by half: every token predicted once, with context.
    context_len = max(1, lm.scorer.max_length // 2)
    nats = -np.array(lm.loglikelihood_rolling(texts, context_len=context_len))
    rows = np.stack([nats, np.array([len(t.encode("utf-8")) for t in texts], dtype=np.float64)], axis=1)
    tokens = sum(len(lm.encode(t)) for t in texts)
    table = {"bits_per_byte": _summary(rows, M.bpb_statistic),
             "perplexity": {"value": math.exp(nats.sum() / tokens), "stderr": None}}
    return {"bits_per_byte": rows}, table


def _generative(task: Task, lm: Any, docs: list[dict], prompts: list[str], samples: int, temperature: float,
                seed: int, chat: bool, allow_code_execution: bool):
    if samples < 1:
        raise UserError(f"--samples must be >= 1, not {samples}")
    # samples == 1: greedy; more: that many sampled answers per question, for pass@k.
    repeated = [p for p in prompts for _ in range(samples)]
    texts = lm.generate(repeated, until=task.until, max_tokens=task.max_tokens,
                        temperature=0.0 if samples == 1 else temperature, seed=None if samples == 1 else seed,
                        chat=chat)
    correct = np.zeros((len(docs), samples))
    flexible = np.zeros((len(docs), samples))    # gsm8k: last number; math_verify: the plain exact match
    for i, doc in enumerate(docs):
        for j in range(samples):
            text = texts[i * samples + j]
            if task.kind == "code":
                from .code_exec import check_problem

                correct[i, j] = float(check_problem(doc["problem"], text))
            elif task.extract == "reasoning_gym":
                from ..data.chat_corpora import score_answer

                correct[i, j] = score_answer(doc["meta"], text)
            else:
                answer = M.EXTRACTORS[task.extract](text)
                exact = M.exact_match(answer, doc["reference"], numeric=task.extract != "none")
                if task.metric == "math_verify":
                    correct[i, j], flexible[i, j] = M.math_verify_match(answer, doc["reference"]), exact
                else:
                    correct[i, j] = exact
                    flexible[i, j] = M.exact_match(M.extract_last_number(text), doc["reference"])
    match_name = "math_verify" if task.metric == "math_verify" else "exact_match"
    if task.kind == "code" or samples > 1:
        table = {}
        passed = (correct >= 1.0).sum(axis=1)
        for k in sorted({1, samples} | ({10} if samples >= 10 else set())):
            values = np.array([M.pass_at_k(samples, int(c), k) for c in passed])
            table[f"pass@{k}"] = _summary(values)
        if task.kind != "code":
            table[match_name] = _summary(correct.mean(axis=1))
        return {"pass@1": correct}, table
    name = "score" if task.extract == "reasoning_gym" else match_name
    table = {name: _summary(correct[:, 0])}
    if task.metric == "math_verify":
        table["exact_match"] = _summary(flexible[:, 0])
    elif task.extract == "gsm8k":
        table["exact_match_flexible"] = _summary(flexible[:, 0])
    return {name: correct}, table
