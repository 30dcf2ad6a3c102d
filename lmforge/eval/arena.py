"""The arena: two models answer the same prompt, anonymised and in random order, and a judge
picks the better answer (the LMSYS Chatbot Arena, on your own models).

    a, b = load_arena_model("smollm2-135m-instruct"), load_arena_model("runs/speedrun+runs/lora")
    judge = ModelJudge(load_arena_model("smollm2-135m-instruct").engine)
    records = run_battles(a, b, load_prompts(), judge=judge, log=BattleLog(DEFAULT_LOG), rounds=20)

- A model is any `lmforge.load` reference, optionally `REF+ADAPTER_DIR` (a PEFT-format LoRA
  adapter, merged at load time like `--adapter`).
- Each battle flips a coin for which model is shown as A; the log stores who sat where.
- Answers go through the inference engine in one batch per model (all prompts at once).
- A model judge is asked twice, with the answers in both orders, because judges (people too)
  favour a position; when the two verdicts disagree the battle is a tie (as in MT-Bench).
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from ..config import REPO_CONFIG_DIR
from ..errors import UserError
from .battle_log import BattleLog, BattleRecord

BUILTIN_PROMPTS = REPO_CONFIG_DIR / "arena_prompts.jsonl"

JUDGE_TEMPLATE = """You are judging two assistant answers to the same question. Reply with exactly one of: A, B, tie.

Question:
{prompt}

Answer A:
{answer_a}

Answer B:
{answer_b}

Which answer is more helpful, correct and clear? Reply A, B or tie."""


@dataclass
class ArenaModel:
    name: str            # what the log and the ratings call it
    ref: str
    adapter: str | None
    engine: Any          # lmforge.infer.Engine


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """"REF" or "REF+ADAPTER_DIR" -> (ref, adapter)."""
    ref, plus, adapter = spec.strip().partition("+")
    if not ref or (plus and not adapter):
        raise UserError(f"model '{spec}' is not REF or REF+ADAPTER_DIR; e.g. smollm2-135m-instruct "
                        "or runs/base+runs/lora-adapter")
    return ref, adapter or None


def model_display_name(ref: str, adapter: str | None) -> str:
    from ..infer.commands import model_name

    return model_name(ref) + (f"+{model_name(adapter)}" if adapter else "")


def split_models(models: str) -> list[str]:
    """--models "A,B" -> ["A", "B"], checked: exactly two different references."""
    specs = [m.strip() for m in models.split(",") if m.strip()]
    if len(specs) != 2:
        raise UserError(f"--models '{models}' names {len(specs)} model(s); an arena battle needs exactly two, "
                        "e.g. --models smollm2-135m-instruct,runs/speedrun")
    if specs[0] == specs[1]:
        raise UserError(f"--models names '{specs[0]}' twice; pick two different models")
    return specs


def load_arena_model(spec: str, device: str = "auto", max_batch_size: int = 8,
                     max_seq_len: int | None = None) -> ArenaModel:
    """Load a model (and its adapter) into an Engine; a bad reference raises UserError."""
    from ..infer.commands import load_engine

    ref, adapter = parse_model_spec(spec)
    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"adapter '{adapter}' in model '{spec}' is not a directory; pass a PEFT-format "
                        "LoRA adapter directory after the '+'")
    args = argparse.Namespace(model=ref, adapter=adapter, device=device, context_policy="truncate_left")
    engine = load_engine(args, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    return ArenaModel(model_display_name(ref, adapter), ref, adapter, engine)


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts from a JSONL file, one {"prompt": "..."} per line (the built-in set by default)."""
    path = Path(path) if path is not None else BUILTIN_PROMPTS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read prompts file {path} ({error}); pass a JSONL file with one "
                        '{"prompt": "..."} per line') from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError("the prompt is not a non-empty string")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path} line {number} is not a JSON object with a \"prompt\" string ({error}); "
                            'write one {"prompt": "..."} per line') from None
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompts; write one {{\"prompt\": \"...\"}} per line")
    return prompts


def chat_prompt_ids(engine: Any, prompt: str, max_new_tokens: int) -> list[int]:
    """The prompt as one user turn in the model's chat template (message text stays plain text)."""
    from ..infer.chat import fit_chat

    _, ids = fit_chat(engine.tokenizer, engine.context_length, [{"role": "user", "content": prompt}], max_new_tokens)
    return ids


def answer_all(engine: Any, prompts: Sequence[str], params: Any) -> list[str]:
    """Every prompt's answer, generated in one engine batch (continuous batching does the rest)."""
    if not prompts:
        return []
    ids = [chat_prompt_ids(engine, p, params.max_new_tokens) for p in prompts]
    return [result.text.strip() for result in engine.generate(ids, params)]


def stream_pair(engine_a: Any, engine_b: Any, prompt: str, params: Any) -> Iterator[tuple[str, str]]:
    """Both answers as they grow: yields (text_a, text_b) so far, alternating engine steps.

    Each `next` on an engine stream steps that engine once, so taking turns lets both answers
    appear side by side without threads."""
    streams = [engine.stream(chat_prompt_ids(engine, prompt, params.max_new_tokens), params)
               for engine in (engine_a, engine_b)]
    texts, live = ["", ""], [True, True]
    try:
        while any(live):
            for side in (0, 1):
                if live[side]:
                    piece = next(streams[side], None)
                    if piece is None:
                        live[side] = False
                    else:
                        texts[side] += piece
            yield texts[0], texts[1]
    finally:
        for stream in streams:
            stream.close()        # cancels a sequence whose page went away


# ------------------------------------------------------------------------------------------ judges


class Judge(Protocol):
    name: str

    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[str]:
        """For each (prompt, answer_a, answer_b): "a", "b" or "tie" (positions, not models)."""


_VERDICT = re.compile(r"\b(tie|a|b)\b", re.IGNORECASE)


def parse_verdict(text: str) -> str:
    """The judge's first "A", "B" or "tie" ("Answer A is better" -> "a"); nothing usable -> "tie"."""
    cleaned = re.sub(r"\banswer\s+", "", text.strip(), flags=re.IGNORECASE)
    match = _VERDICT.search(cleaned)
    return match.group(1).lower() if match else "tie"


def both_orders_verdict(first: str, swapped: str) -> str:
    """Combine the verdict on (A, B) and the verdict on (B, A) into one for (A, B).

    Agreement ("a" then "b", "b" then "a", "tie" then "tie") keeps it; anything else, such as a
    judge that always picks the first position, is a tie."""
    unswap = {"a": "b", "b": "a", "tie": "tie"}[swapped]
    return first if first == unswap else "tie"


class ModelJudge:
    """A judge model, prompted with JUDGE_TEMPLATE and decoded greedily."""

    def __init__(self, engine: Any, name: str = "judge", max_new_tokens: int = 8) -> None:
        self.engine, self.name, self.max_new_tokens = engine, name, max_new_tokens

    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[str]:
        from ..infer import SamplingParams

        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        prompts = [JUDGE_TEMPLATE.format(prompt=p, answer_a=a, answer_b=b) for p, a, b in items]
        return [parse_verdict(text) for text in answer_all(self.engine, prompts, params)]


def judge_both_orders(judge: Judge, items: Sequence[tuple[str, str, str]]) -> list[str]:
    """One verdict per (prompt, answer_a, answer_b), each asked in both orders (one batch)."""
    asked = list(items) + [(p, b, a) for p, a, b in items]
    verdicts = judge.judge(asked)
    n = len(items)
    return [both_orders_verdict(verdicts[k], verdicts[n + k]) for k in range(n)]


# ------------------------------------------------------------------------------------------ battles


@dataclass
class Matchup:
    prompt: str
    model_a: ArenaModel     # shown as A
    model_b: ArenaModel


def draw_matchups(first: ArenaModel, second: ArenaModel, prompts: Sequence[str], rounds: int,
                  rng: random.Random) -> list[Matchup]:
    """`rounds` prompts (cycling through a shuffled copy), each with a coin flip for the seats."""
    if rounds < 1:
        raise UserError(f"--rounds {rounds} is below 1; ask for at least one battle")
    order = list(prompts)
    rng.shuffle(order)
    matchups = []
    for k in range(rounds):
        a, b = (first, second) if rng.random() < 0.5 else (second, first)
        matchups.append(Matchup(order[k % len(order)], a, b))
    return matchups


def answer_matchups(matchups: Sequence[Matchup], params: Any) -> list[tuple[str, str]]:
    """(answer_a, answer_b) for each matchup: each model answers every distinct prompt in one batch."""
    prompts = sorted({mu.prompt for mu in matchups})
    models = {m.name: m for mu in matchups for m in (mu.model_a, mu.model_b)}
    answers = {name: dict(zip(prompts, answer_all(model.engine, prompts, params))) for name, model in models.items()}
    return [(answers[mu.model_a.name][mu.prompt], answers[mu.model_b.name][mu.prompt]) for mu in matchups]


def run_battles(first: ArenaModel, second: ArenaModel, prompts: Sequence[str], params: Any, log: BattleLog,
                judge: Judge | None = None, vote: Callable[[Matchup, str, str], str] | None = None,
                rounds: int = 10, seed: int = 0, session: str = "") -> list[BattleRecord]:
    """Battle `rounds` times and append each verdict to `log` as soon as it is known.

    The judge is a model (`judge`, both orders) or a person (`vote(matchup, answer_a, answer_b)`
    returns "a", "b", "tie" or "both_bad"; the terminal asks it in `lmforge arena battle`)."""
    if (judge is None) == (vote is None):
        raise ValueError("pass exactly one of judge and vote")
    matchups = draw_matchups(first, second, prompts, rounds, random.Random(seed))
    answers = answer_matchups(matchups, params)
    if judge is not None:
        verdicts: Iterator[str] = iter(judge_both_orders(judge, [(m.prompt, a, b) for m, (a, b) in zip(matchups, answers)]))
        judge_name = judge.name
    else:
        verdicts = (vote(m, a, b) for m, (a, b) in zip(matchups, answers))
        judge_name = "human"
    records = []
    for matchup, (answer_a, answer_b), winner in zip(matchups, answers, verdicts):
        record = BattleRecord(model_a=matchup.model_a.name, model_b=matchup.model_b.name, winner=winner,
                              judge=judge_name, prompt=matchup.prompt, answer_a=answer_a, answer_b=answer_b,
                              session=session)
        log.record(record)           # on disk before the next vote is asked for
        records.append(record)
    return records
