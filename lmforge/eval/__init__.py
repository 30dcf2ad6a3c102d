"""lmforge.eval: validation loss, perplexity and bits per byte; benchmarks (`lmforge eval`).

    from lmforge.eval import evaluate_objective
    metrics = evaluate_objective(model, objective, batches, bytes_per_token=meta.val.bytes_per_token)
    # {"val_loss": 1.52, "val_ppl": 4.57, "val_bpb": 0.61, "val_accuracy": 0.55}

    lm = EvalModel.load("smollm2-135m-instruct")
    result = run_task(load_task("mmlu-fewshot"), lm, limit=50)     # a TaskResult (results.py)

Names are imported on first use, so importing the package does not load torch.
"""
from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "evaluate_objective": "lmforge.eval.loss",
    "bits_per_byte": "lmforge.eval.loss",
    "perplexity": "lmforge.eval.loss",
    # benchmarks (`lmforge eval`)
    "EvalModel": "lmforge.eval.lm",
    "Scorer": "lmforge.eval.requests",
    "rolling_windows": "lmforge.eval.requests",
    "generate_until": "lmforge.eval.requests",
    "Task": "lmforge.eval.tasks",
    "run_task": "lmforge.eval.tasks",
    "load_task": "lmforge.eval.task_data",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
