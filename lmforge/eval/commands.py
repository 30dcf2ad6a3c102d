"""`lmforge eval`: benchmark a model on built-in, user or lm-eval tasks; print a table, write the results.

    lmforge eval --model smollm2-135m-instruct --tasks gsm8k-mini,mmlu-fewshot,shakespeare-bpb
    lmforge eval --model runs/my-run --tasks tasks/capitals.yaml --limit 50
    lmforge eval --model smollm2-135m-instruct --harness my_task --include-path tasks/   # lm-eval tasks

Results go to --out (default artifacts/eval/NAME-DATE.json, the file `lmforge leaderboard`
reads); when --model is a run directory, also to RUN/eval/results-DATE.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UserError

EXAMPLE = "lmforge eval --model smollm2-135m-instruct --tasks gsm8k-mini,mmlu-fewshot,shakespeare-bpb"


def configure(parser: argparse.ArgumentParser) -> None:
    from ..cli import HelpFormatter

    parser.formatter_class = HelpFormatter
    parser.epilog = (f"example:\n  {EXAMPLE}\n  lmforge eval --model runs/my-run --tasks tasks/capitals.yaml --limit 50\n"
                     "  lmforge eval --model smollm2-135m-instruct --harness my_task --include-path tasks/\n\n"
                     "tasks: gsm8k, gsm8k-mini, humaneval (needs --allow-code-execution), mmlu-fewshot, "
                     "shakespeare-bpb,\n  reasoning-gym:TASK?size=N&seed=S, or a task YAML file "
                     "(see lmforge/eval/task_data.py)")
    parser.add_argument("--model", required=True, help="anything lmforge.load accepts: bundled name, run, HF dir, .gguf")
    parser.add_argument("--tasks", default=None, help="comma-separated task names or task YAML files")
    parser.add_argument("--harness", default=None, help="comma-separated lm-eval task names (run through lm-eval)")
    parser.add_argument("--include-path", default=None, help="folder of lm-eval task YAMLs for --harness")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and sampled answers")
    parser.add_argument("--samples", type=int, default=1,
                        help="answers per generative question: 1 = greedy; k > 1 sampled, for pass@k")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    parser.add_argument("--chat", action="store_true", default=None,
                        help="wrap generative prompts in the model's chat template (default: each task's own)")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="run model-written code for HumanEval (sandboxed: time/memory limits, no network)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences generated together")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per log-likelihood forward")
    parser.add_argument("--prompt-lookup", type=int, default=4, metavar="N",
                        help="greedy answers: draft N tokens per step by prompt lookup, keep what the model's "
                             "argmax agrees with (the same text, fewer forwards); 0 = off")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights dtype (None: fp32)")
    parser.add_argument("--out", default=None, help="results JSON (default: artifacts/eval/NAME-DATE.json)")
    parser.set_defaults(func=run_eval)


def model_name(ref: str) -> str:
    path = Path(ref)
    return path.name if path.exists() else ref


def run_eval(args: argparse.Namespace) -> int:
    if not args.tasks and not args.harness:
        raise UserError("name the tasks to run with --tasks (e.g. --tasks mmlu-fewshot) or --harness TASKS")
    if args.harness and args.tasks:
        raise UserError("give either --tasks (lmforge tasks) or --harness (lm-eval tasks), not both")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, not {args.limit}")
    if args.include_path and not Path(args.include_path).is_dir():
        raise UserError(f"--include-path '{args.include_path}' is not a folder; point it at lm-eval task YAMLs")
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    started = time.perf_counter()
    if args.harness:
        results = run_harness(args)
    else:
        from .task_data import load_task

        names = [name.strip() for name in args.tasks.split(",") if name.strip()]
        tasks = [load_task(name) for name in names]             # bad task names fail before the model loads
        from .lm import EvalModel
        from .tasks import run_task

        lm = EvalModel.load(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                            batch_tokens=args.batch_tokens, prompt_lookup=args.prompt_lookup)
        task_results = {}
        for task in tasks:
            task_started = time.perf_counter()
            shown = min(len(task.docs), args.limit or len(task.docs))
            print(f"{task.name}: {shown} {'passages' if task.kind == 'perplexity' else 'questions'} ...",
                  file=sys.stderr, flush=True)
            task_results[task.name] = run_task(task, lm, limit=args.limit, num_fewshot=args.num_fewshot,
                                               seed=args.seed, samples=args.samples, temperature=args.temperature,
                                               allow_code_execution=args.allow_code_execution, chat=args.chat)
            task_results[task.name].config["seconds"] = round(time.perf_counter() - task_started, 1)
            print(f"{task.name}: {task_results[task.name].metric} {task_results[task.name].value:.4f} "
                  f"({task_results[task.name].config['seconds']} s)", file=sys.stderr, flush=True)
        from .results import EvalResults

        results = EvalResults(model=args.model, model_name=model_name(args.model), parameters=lm.parameters(),
                              tasks=task_results, config=settings)
    results.config["seconds"] = round(time.perf_counter() - started, 1)
    print_table(results)
    for path in output_paths(args.model, args.out, results.model_name):
        results.save(path)
        print(f"wrote {path}")
    return 0


def output_paths(ref: str, out: str | None, name: str) -> list[Path]:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    paths = [Path(out) if out else Path("artifacts") / "eval" / f"{name}-{stamp}.json"]
    run = Path(ref)
    if run.is_dir() and (run / "checkpoints").is_dir():   # a training run keeps its own evaluations
        paths.append(run / "eval" / f"results-{stamp}.json")
    return paths


def run_harness(args: argparse.Namespace):
    """Run lm-eval tasks on our backend (lmforge.eval.harness) and convert its results."""
    import lm_eval
    import lm_eval.tasks

    from . import harness  # noqa: F401  (registers the "lmforge" model type)
    from .results import EvalResults, TaskResult

    manager = lm_eval.tasks.TaskManager(include_path=args.include_path)
    names = [name.strip() for name in args.harness.split(",") if name.strip()]
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval knows no task {', '.join(unknown)}; check the names"
                        + ("" if args.include_path else " or pass --include-path with your task YAMLs"))
    model_args = (f"model={args.model},device={args.device},batch_tokens={args.batch_tokens},"
                  f"prompt_lookup={args.prompt_lookup}") + (
        f",dtype={args.dtype}" if args.dtype else "")
    output = lm_eval.simple_evaluate(model="lmforge", model_args=model_args, tasks=names, task_manager=manager,
                                     limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                     random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                     fewshot_random_seed=args.seed)
    tasks: dict[str, TaskResult] = {}
    for name, values in output["results"].items():
        metrics: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            if "," not in key or key.split(",")[0].endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            label = metric if filter_name == "none" else f"{metric}[{filter_name}]"
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            metrics[label] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        if not metrics:
            continue
        primary = next(iter(metrics))
        n = output.get("n-samples", {}).get(name, {}).get("effective", 0)
        tasks[name] = TaskResult(primary, metrics[primary]["value"], metrics[primary]["stderr"], int(n), metrics,
                                 {"num_fewshot": output.get("n-shot", {}).get(name), "harness": True})
    from ..model.info import count_parameters
    from ..model.loading import resolve_config

    parameters = count_parameters(resolve_config(args.model)).total
    return EvalResults(model=args.model, model_name=model_name(args.model), parameters=parameters, tasks=tasks,
                       config={k: v for k, v in vars(args).items() if k != "func"})


def print_table(results) -> None:
    from rich.console import Console
    from rich.table import Table

    from .results import LOWER_IS_BETTER

    table = Table(title=f"{results.model_name} ({results.parameters / 1e6:.1f} M parameters)")
    for column in ("task", "metric", "value", "± stderr", "n", "shots", "other metrics"):
        table.add_column(column, justify="right" if column in ("value", "± stderr", "n", "shots") else "left")
    for name, task in results.tasks.items():
        arrow = "↓" if task.metric in LOWER_IS_BETTER else "↑"
        others = ", ".join(f"{k} {v['value']:.4f}" for k, v in task.metrics.items()
                           if k != task.metric and v.get("value") is not None)
        table.add_row(name, f"{task.metric} {arrow}", f"{task.value:.4f}",
                      "" if task.stderr is None else f"{task.stderr:.4f}", str(task.n),
                      str(task.config.get("num_fewshot", "")), others)
    Console().print(table)
