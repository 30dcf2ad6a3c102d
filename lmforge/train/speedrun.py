"""`lmforge speedrun`: the whole pretraining pipeline on a laptop CPU, in about five minutes.

    tokenizer (BPE on Shakespeare) -> token shards -> pretrain for a wall-clock budget
    -> evaluate on held-out plays -> samples -> runs/<name>/report.md with plots

The tokenizer and the shards are cached under `artifacts/speedrun/` (they are keyed by the
vocabulary size and checked by fingerprint), so a second run spends its time training.
`--objective mlm` trains a BERT instead and reports masked-token accuracy;
`--recipe gpt2` spends the same budget on a GPT-2-style model (LayerNorm, learned positions, GELU).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cli import HelpFormatter
from ..errors import UserError
from ..io import write_json_atomic, write_text_atomic

RECIPES = {("clm", "modern"): "speedrun-gpt", ("clm", "gpt2"): "speedrun-gpt2", ("mlm", "modern"): "speedrun-bert"}
SAMPLE_PROMPTS = ("ROMEO:", "KING HENRY:\nWhat", "To be, or not to be")
FILL_MASK_TEXTS = ("O Romeo, Romeo! wherefore art thou {mask}?", "Now is the winter of our {mask}.",
                   "All the world's a {mask}, and all the men and women merely players.")


@dataclass
class SpeedrunConfig:
    minutes: float = 5.0                   # training budget (wall clock); set-up and evaluation come on top
    objective: str = "clm"                 # clm (GPT) | mlm (BERT)
    recipe: str = "modern"                 # modern (RMSNorm, RoPE, SwiGLU, GQA) | gpt2 (LayerNorm, learned positions, GELU)
    vocab_size: int = 4096
    name: str | None = None                # default: speedrun-<objective>-<recipe>-<timestamp>
    out_dir: str = "runs"
    artifacts: str = "artifacts/speedrun"  # cached tokenizer and shards
    overrides: list[str] = field(default_factory=list)   # key=value for the pretraining config

    def validate(self) -> "SpeedrunConfig":
        if (self.objective, self.recipe) not in RECIPES:
            raise UserError(f"--objective {self.objective} --recipe {self.recipe} is not a speedrun; choose from "
                            + ", ".join(f"{o}/{r}" for o, r in RECIPES))
        if self.minutes <= 0:
            raise UserError(f"--minutes must be positive, not {self.minutes}")
        return self


@dataclass
class SpeedrunResult:
    run_dir: Path
    report: Path
    figures: dict[str, Any]


def speedrun(config: SpeedrunConfig) -> SpeedrunResult:
    """Run every stage and write the report; returns its figures (also in report.json)."""
    from ..data import describe_shards
    from ..model.info import count_parameters
    from .config import load_pretrain_config
    from .pretraining import pretrain

    config.validate()
    started = time.perf_counter()
    # The masked LM has one recipe, the original BERT's; "modern" would misname it.
    recipe = config.recipe if config.objective == "clm" else "bert"
    name = config.name or f"speedrun-{config.objective}-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    artifacts = Path(config.artifacts)
    _say(f"[1/4] tokenizer: byte-level BPE, vocabulary {config.vocab_size}, on Shakespeare")
    tokenizer_dir, tokenizer_seconds = _tokenizer(artifacts / f"tokenizer-{config.vocab_size}", config.vocab_size)
    _say("[2/4] data: Shakespeare -> token shards (whole plays held out for validation)")
    data_dir, data_seconds = _shards(artifacts / f"shakespeare-{config.vocab_size}", tokenizer_dir)
    _say(describe_shards(data_dir))

    pretrain_config = load_pretrain_config(RECIPES[(config.objective, config.recipe)], [
        f"data={data_dir}", f"name={name}", f"out_dir={config.out_dir}", f"max_minutes={config.minutes}",
        "max_steps=none", *config.overrides])
    _say(f"[3/4] pretrain: {config.minutes:g} minutes of {'GPT' if config.objective == 'clm' else 'BERT'} "
         f"training ({recipe} recipe)")
    result = pretrain(pretrain_config)

    _say("[4/4] evaluate, sample and report")
    run_dir = result.run_dir
    rows = result.history
    train_rows = [row for row in rows if "tokens_per_s" in row]
    # Skip the first logged rows: they include start-up (allocations, first-iteration overheads).
    steady = train_rows[len(train_rows) // 5:] or train_rows
    resolved = _read_yaml(run_dir / "config.yaml")
    figures: dict[str, Any] = {
        "name": name, "objective": config.objective,
        "recipe": config.recipe if config.objective == "clm" else "original BERT (post-norm, learned positions, GELU)",
        # The model as trained: its vocabulary is the tokenizer's, not the recipe's placeholder.
        "preset": pretrain_config.preset, "parameters": count_parameters(dataclasses.replace(
            pretrain_config.model, vocab_size=resolved["model"]["vocab_size"])).total,
        "budget_minutes": config.minutes, "train_seconds": round(_last(train_rows, "elapsed_s") or 0.0, 1),
        "steps": result.step, "tokens_seen": result.tokens, "stop_reason": result.stop_reason,
        "precision": resolved.get("precision", pretrain_config.precision),
        "tokens_per_s": _mean(steady, "tokens_per_s"), "mfu": _mean(steady, "mfu"),
        "final_train_loss": result.train_loss,
        **{key: value for key, value in result.eval_metrics.items()},
        "tokenizer_seconds": round(tokenizer_seconds, 1), "data_seconds": round(data_seconds, 1),
    }
    samples = _samples(run_dir, config.objective)
    figures["total_seconds"] = round(time.perf_counter() - started, 1)
    plot = run_dir / "curves.png"
    from ..track import plot_runs

    plot_runs([run_dir], plot, title=f"{name}: {figures['parameters'] / 1e6:.2f}M parameters, {config.minutes:g} min")
    report = run_dir / "report.md"
    write_text_atomic(report, _report_markdown(figures, resolved, samples, plot.name, data_dir))
    write_json_atomic(run_dir / "report.json", {**figures, "samples": samples})
    _say(_summary_line(figures))
    _say(f"report: {report}")
    return SpeedrunResult(run_dir, report, figures)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _tokenizer(directory: Path, vocab_size: int) -> tuple[Path, float]:
    """Train (or reuse) the Shakespeare tokenizer. Reuse needs the same vocabulary size."""
    from ..assets import shakespeare_play_files
    from ..tokenizer import load_tokenizer, train_bpe

    start = time.perf_counter()
    if (directory / "tokenizer.json").is_file():
        if load_tokenizer(directory).vocab_size == vocab_size:
            _say(f"      reusing {directory}")
            return directory, 0.0
    tokenizer = train_bpe(shakespeare_play_files(), vocab_size=vocab_size)
    tokenizer.save(directory)
    seconds = time.perf_counter() - start
    _say(f"      trained in {seconds:.1f}s -> {directory}")
    return directory, seconds


def _shards(directory: Path, tokenizer_dir: Path) -> tuple[Path, float]:
    """Prepare (or reuse) the shards; reuse needs the tokenizer's fingerprint to match."""
    from ..data import prepare_shards, read_meta
    from ..tokenizer import load_tokenizer

    start = time.perf_counter()
    if (directory / "meta.json").is_file():
        try:
            if read_meta(directory).tokenizer_fingerprint == load_tokenizer(tokenizer_dir).fingerprint():
                _say(f"      reusing {directory}")
                return directory, 0.0
        except UserError:
            pass  # unreadable or stale: prepare again
    prepare_shards("shakespeare", tokenizer_dir, directory)
    return directory, time.perf_counter() - start


def _samples(run_dir: Path, objective: str) -> list[dict[str, str]]:
    """Text from the trained model: continuations (GPT) or fill-in-the-blank predictions (BERT)."""
    import torch

    from ..model.loading import load

    model, tokenizer = load(run_dir)
    if objective == "clm":
        from ..infer import Engine, SamplingParams

        engine = Engine(model, tokenizer, max_batch_size=len(SAMPLE_PROMPTS))
        params = SamplingParams(max_new_tokens=120, temperature=0.8, top_k=50, seed=0)
        results = engine.generate(list(SAMPLE_PROMPTS), params)
        return [{"prompt": prompt, "text": prompt + result.text} for prompt, result in zip(SAMPLE_PROMPTS, results)]
    mask = next(token for token, index in tokenizer.special_tokens.items() if index == tokenizer.mask_id)
    samples = []
    for text in FILL_MASK_TEXTS:
        ids = tokenizer.encode(text.format(mask=" " + mask))
        position = ids.index(tokenizer.mask_id)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, position]
        top = logits.topk(5).indices.tolist()
        samples.append({"prompt": text.format(mask="___"),
                        "text": ", ".join(repr(tokenizer.decode([token])) for token in top)})
    return samples


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
    return values[-1] if values else None


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
    return round(sum(values) / len(values), 4) if values else None


def _summary_line(figures: dict[str, Any]) -> str:
    parts = [f"{figures['parameters'] / 1e6:.2f}M params", f"{figures['tokens_seen']:,} tokens",
             f"{figures['tokens_per_s'] or 0:,.0f} tokens/s"]
    for key in ("val_loss", "val_bpb", "val_mlm_accuracy"):
        if figures.get(key) is not None:
            parts.append(f"{key} {figures[key]:.4f}")
    return "speedrun done: " + ", ".join(parts)


def _report_markdown(figures: dict[str, Any], resolved: dict[str, Any], samples: list[dict[str, str]],
                     plot_name: str, data_dir: Path) -> str:
    import torch

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    rows = [("objective", "causal LM (GPT)" if figures["objective"] == "clm" else "masked LM (BERT)"),
            ("recipe", figures["recipe"]), ("preset", figures["preset"]), ("parameters", figures["parameters"]),
            ("training budget", f"{figures['budget_minutes']:g} min ({figures['train_seconds']} s of training)"),
            ("optimizer steps", figures["steps"]), ("tokens seen", figures["tokens_seen"]),
            ("precision", figures["precision"]), ("throughput (tokens/s)", figures["tokens_per_s"]),
            ("MFU (vs measured matmul peak)", f"{(figures['mfu'] or 0):.1%}"),
            ("final train loss", figures["final_train_loss"])]
    rows += [(key, figures[key]) for key in ("val_loss", "val_ppl", "val_bpb", "val_mlm_accuracy") if key in figures]
    def seconds(value: float) -> str:
        return f"{value} s" if value else "cached"

    rows += [("tokenizer / shards / whole speedrun",
              f"{seconds(figures['tokenizer_seconds'])} / {seconds(figures['data_seconds'])} / {figures['total_seconds']} s")]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [f"# Speedrun report: {figures['name']}", "",
             f"Shakespeare (`{data_dir}`), validation on held-out plays. Machine: {machine}.", "",
             "| quantity | value |", "| --- | --- |"]
    lines += [f"| {name} | {fmt(value)} |" for name, value in rows]
    lines += ["", f"![training curves]({plot_name})", ""]
    if figures["objective"] == "clm":
        lines += ["val_bpb is bits per UTF-8 byte of the held-out plays: it does not depend on the tokenizer, so "
                  "runs with different vocabularies compare fairly.", ""]
    else:
        lines += ["val_mlm_accuracy is the share of masked held-out tokens (15%, BERT's 80/10/10 scheme) whose "
                  "top prediction is right.", ""]
    lines += ["## Samples" if figures["objective"] == "clm" else "## Fill in the blank (top-5 predictions)", ""]
    for sample in samples:
        if figures["objective"] == "clm":
            lines += ["```text", sample["text"].strip(), "```", ""]
        else:
            lines += [f"- {sample['prompt']} -> {sample['text']}"]
    lines += ["", "## Resolved config", "", "```yaml", _yaml_dump(resolved).strip(), "```", ""]
    return "\n".join(lines)


def _yaml_dump(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train a tokenizer, prepare Shakespeare shards, pretrain for a fixed wall-clock budget, "
                          "evaluate, sample and write runs/<name>/report.md (what `make demo` runs).")
    parser.epilog = ("example:\n  lmforge speedrun --minutes 5\n"
                     "  lmforge speedrun --objective mlm --minutes 5      # a BERT, with masked-token accuracy\n"
                     "  lmforge speedrun --recipe gpt2 lr=1e-3            # GPT-2-style model, same budget")
    parser.formatter_class = HelpFormatter
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget in wall-clock minutes")
    parser.add_argument("--objective", choices=["clm", "mlm"], default="clm", help="clm: GPT; mlm: BERT")
    parser.add_argument("--recipe", choices=["modern", "gpt2"], default="modern",
                        help="modern: RMSNorm+RoPE+SwiGLU+GQA; gpt2: LayerNorm+learned positions+GELU")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--name", default=None, help="run name (default: speedrun-<objective>-<recipe>-<time>)")
    parser.add_argument("--out-dir", default="runs", help="where runs are written")
    parser.add_argument("--artifacts", default="artifacts/speedrun", help="cache for the tokenizer and shards")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    speedrun(SpeedrunConfig(minutes=args.minutes, objective=args.objective, recipe=args.recipe,
                            vocab_size=args.vocab_size, name=args.name, out_dir=args.out_dir,
                            artifacts=args.artifacts, overrides=list(args.overrides)))
    return 0
