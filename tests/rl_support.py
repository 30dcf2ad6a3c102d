"""Helpers for tests/test_align_grpo_ppo.py: reward callables and prompt files a tiny GPT can learn from."""
from __future__ import annotations

import json
from pathlib import Path


def letter_e(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The share of a completion's characters that are 'e' (a reward a random tiny GPT can climb)."""
    return [c.count("e") / max(len(c), 1) for c in completions]


def raises(prompts: list[str], completions: list[str], **_) -> list[float]:
    raise RuntimeError("the scorer broke")


def not_numbers(prompts: list[str], completions: list[str], **_) -> list:
    return ["high"] * len(completions)


def write_prompts(path: Path, n: int = 48) -> Path:
    words = ["ROMEO", "JULIET", "KING", "QUEEN", "LORD", "LADY"]
    rows = [{"prompt": f"{words[i % 6]} speaks of {words[(i * 5) % 6]}", "answer": str(i % 7)} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
