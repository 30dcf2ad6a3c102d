"""The eval results file: what `lmforge eval` writes and `lmforge leaderboard` reads.

One JSON object per evaluation of one model:

    {"format": "lmforge-eval/1",
     "lmforge_version": "0.1.0", "date": "2026-12-01T10:20:00+00:00",
     "model": "smollm2-135m-instruct",          # the reference it was loaded from
     "model_name": "smollm2-135m-instruct",     # a short display name
     "parameters": 134515008,
     "tasks": {"gsm8k-mini": {"metric": "exact_match", "value": 0.12, "stderr": 0.03, "n": 100,
                              "metrics": {"exact_match": {"value": 0.12, "stderr": 0.03}},
                              "config": {"num_fewshot": 0, "seed": 1234}}},
     "config": {...}}                            # the eval command's settings

`value` is always "higher is better" except for metrics named in LOWER_IS_BETTER.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import write_json_atomic

FORMAT = "lmforge-eval/1"
LOWER_IS_BETTER = frozenset({"bits_per_byte", "perplexity", "word_perplexity", "byte_perplexity", "loss"})


@dataclass
class TaskResult:
    metric: str                                   # the primary metric
    value: float
    stderr: float | None
    n: int
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResults:
    model: str
    model_name: str
    parameters: int
    tasks: dict[str, TaskResult]
    config: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    lmforge_version: str = ""

    def to_json(self) -> dict[str, Any]:
        from .. import __version__

        return {"format": FORMAT, "lmforge_version": self.lmforge_version or __version__, "date": self.date,
                "model": self.model, "model_name": self.model_name, "parameters": self.parameters,
                "tasks": {name: vars(task) for name, task in self.tasks.items()}, "config": self.config}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, _finite(self.to_json()))
        return path


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def load_results(path: str | Path) -> EvalResults:
    """Read one results file; a file that is not one raises UserError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
        tasks = {name: TaskResult(metric=str(t["metric"]), value=float(t["value"]) if t["value"] is not None else math.nan,
                                  stderr=None if t.get("stderr") is None else float(t["stderr"]), n=int(t["n"]),
                                  metrics=dict(t.get("metrics", {})), config=dict(t.get("config", {})))
                 for name, t in data["tasks"].items()}
        return EvalResults(model=str(data["model"]), model_name=str(data["model_name"]),
                           parameters=int(data["parameters"]), tasks=tasks, config=dict(data.get("config", {})),
                           date=str(data["date"]), lmforge_version=str(data.get("lmforge_version", "")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path} is not an lmforge eval results file ({error}); "
                        "pass files written by `lmforge eval`") from None
