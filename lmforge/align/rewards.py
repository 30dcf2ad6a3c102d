"""Reward functions for GRPO, RLOO and PPO: what a sampled completion is worth.

    rewards = RewardFunctions(["task", "format"], weights=[1.0, 0.2])
    scores, per_function = rewards(prompts, completions)          # [N] floats, {name: [N]}

Built-in (a name in the config's `rewards` list):
    task     the reasoning-gym task's own scorer (0..1), read from the prompt's meta
    gsm8k    1.0 when the completion's answer ("#### N", else its last number) equals the prompt's
             reference answer numerically (GSM8K-style exact match), else 0.0
    format   1.0 when the completion puts its answer in exactly one <answer>...</answer> block
Any other name is a Python callable `package.module:function` (or `path/to/file.py:function`),
called as TRL calls its reward functions:

    def my_reward(prompts: list[str], completions: list[str], answers: list, metas: list, **_) -> list[float]

A callable that raises, or returns something that is not one finite number per completion, stops
training with an error naming it (a silently wrong reward trains the wrong thing).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError

BUILTIN_REWARDS = ("task", "gsm8k", "format")
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class Prompt:
    """One training or evaluation prompt: the conversation so far, and what scores a reply to it."""

    messages: list[dict[str, str]]        # ends with the user's turn
    answer: str | None = None             # the reference answer (gsm8k reward, reports)
    meta: dict[str, Any] | None = None    # reasoning-gym's {"task", "entry"} (task reward)
    source: str = ""

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def task_reward(prompts: list[Prompt], completions: list[str]) -> list[float]:
    from ..data.chat_corpora import score_answer

    missing = next((p for p in prompts if not p.meta), None)
    if missing is not None:
        raise UserError(f"reward 'task' needs reasoning-gym prompts (with meta), but prompt '{missing.source}' has "
                        "none; use rewards=[gsm8k] or a callable for other prompts")
    return [score_answer(p.meta, c) for p, c in zip(prompts, completions)]


def gsm8k_reward(prompts: list[Prompt], completions: list[str]) -> list[float]:
    from ..eval.metrics import extract_gsm8k, extract_last_number, normalize_number

    scores = []
    for prompt, completion in zip(prompts, completions):
        if prompt.answer is None:
            raise UserError(f"reward 'gsm8k' needs a reference answer, but prompt '{prompt.source}' has none; "
                            "give the prompt file an 'answer' field")
        reference = extract_gsm8k(prompt.answer) or normalize_number(prompt.answer)
        found = extract_gsm8k(completion) or extract_last_number(completion)
        scores.append(float(found is not None and found == reference))
    return scores


def format_reward(prompts: list[Prompt], completions: list[str]) -> list[float]:
    return [float(len(ANSWER_BLOCK.findall(c)) == 1) for c in completions]


BUILTIN: dict[str, Callable[[list[Prompt], list[str]], list[float]]] = {
    "task": task_reward, "gsm8k": gsm8k_reward, "format": format_reward}


def import_callable(reference: str) -> Callable[..., Any]:
    """`package.module:function` or `path/to/file.py:function` -> the function (UserError if absent)."""
    module_name, _, attribute = reference.rpartition(":")
    if not module_name or not attribute:
        raise UserError(f"reward '{reference}' is neither built in ({', '.join(BUILTIN_REWARDS)}) nor a callable "
                        "written as package.module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"reward '{reference}': file '{module_name}' does not exist")
            spec = importlib.util.spec_from_file_location(f"lmforge_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"reward '{reference}': importing '{module_name}' failed ({type(error).__name__}: "
                        f"{error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserError(f"reward '{reference}': '{module_name}' has no function '{attribute}'")
    return function


class RewardFunctions:
    """The weighted sum of several reward functions, each checked on every call."""

    def __init__(self, names: list[str], weights: list[float] | None = None) -> None:
        if not names:
            raise UserError("rewards is empty; name at least one reward function (e.g. rewards=[task])")
        if weights is not None and len(weights) != len(names):
            raise UserError(f"reward_weights has {len(weights)} values for {len(names)} rewards; give one per reward")
        self.names = list(names)
        self.weights = list(weights) if weights is not None else [1.0] * len(names)
        self.functions = [BUILTIN.get(name) or self._user_function(name) for name in names]

    @staticmethod
    def _user_function(name: str) -> Callable[[list[Prompt], list[str]], list[float]]:
        function = import_callable(name)

        def call(prompts: list[Prompt], completions: list[str]) -> Any:
            return function(prompts=[p.text for p in prompts], completions=completions,
                            answers=[p.answer for p in prompts], metas=[p.meta for p in prompts])
        return call

    @property
    def verifiable(self) -> str | None:
        """The first correctness reward (task or gsm8k): what 'accuracy' and pass@k count."""
        return next((name for name in self.names if name in ("task", "gsm8k")), None)

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per completion [N], each function's scores [N] by name)."""
        per_function: dict[str, list[float]] = {}
        for name, function in zip(self.names, self.functions):
            try:
                scores = function(prompts, completions)
            except UserError:
                raise
            except Exception as error:
                raise UserError(f"reward function '{name}' raised {type(error).__name__}: {error}; fix it "
                                "(training stopped before using its scores)") from None
            per_function[name] = check_scores(name, scores, len(completions))
        totals = [sum(w * per_function[n][i] for n, w in zip(self.names, self.weights)) for i in range(len(completions))]
        return totals, per_function


def check_scores(name: str, scores: Any, expected: int) -> list[float]:
    """One finite float per completion, or a UserError naming the function and what it returned."""
    try:
        values = list(scores)
    except TypeError:
        raise UserError(f"reward function '{name}' returned {type(scores).__name__}, not a list of numbers; "
                        "return one number per completion") from None
    if len(values) != expected:
        raise UserError(f"reward function '{name}' returned {len(values)} scores for {expected} completions; "
                        "return one number per completion")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise UserError(f"reward function '{name}' returned {value!r}, which is not a finite number; return "
                            "one float per completion")
    return [float(v) for v in values]


def load_prompts(source: str, limit: int | None = None) -> list[Prompt]:
    """Prompts from `reasoning-gym:TASK?size=N&seed=S&...` or a JSONL file of {"prompt", "answer"?, "meta"?}."""
    from ..data.chat_corpora import builtin_conversations, is_builtin

    if is_builtin(source):
        if not source.startswith(("reasoning-gym:", "reasoning_gym:")):
            raise UserError(f"prompts '{source}' is a chat corpus without answers to score; use "
                            "reasoning-gym:TASK?size=N or a JSONL file of prompts")
        conversations = builtin_conversations(source, limit)
        return [Prompt(c.messages[:-1], c.messages[-1]["content"], c.meta, c.source) for c in conversations]
    if not Path(source).is_file():
        raise UserError(f"prompts '{source}' is neither a reasoning-gym task nor an existing JSONL file")
    return read_prompt_file(source, limit)


def read_prompt_file(source: str, limit: int | None = None) -> list[Prompt]:
    """A JSONL file of {"prompt": text or messages, "answer"?, "meta"?}; UserError naming a bad line."""
    import json

    from .data import _messages

    path = Path(source)
    if not path.is_file():
        raise UserError(f"prompt file '{source}' does not exist; give a JSONL file of {{\"prompt\": ...}} lines")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not valid JSON ({error.msg}); fix that line") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise UserError(f"{where}: missing field prompt (a line is {{\"prompt\", \"answer\"?, \"meta\"?}}); "
                            "fix that line")
        messages = _messages(record["prompt"], "user", where, "prompt")
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise UserError(f"{where}: 'answer' must be a string or a number; fix that line")
        prompts.append(Prompt(messages, None if answer is None else str(answer), record.get("meta"), where))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"prompt file '{source}' holds no prompts")
    return prompts
