"""`lmforge quantize`: the quantization lab.

Shows where LLM.int8()'s outlier features appear in a model's activations (which hidden dims, in
how many layers and tokens), then the held-out Shakespeare perplexity of the model in fp32, in
LLM.int8() with and without the mixed-precision decomposition, and with weight-only int8, NF4 and
Q4_0 weights. Writes OUT/report.md and OUT/outliers.png (max |x| per layer and hidden dim).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..cli import HelpFormatter
from ..errors import UserError
from .calibrate import CALIBRATION_TEXT_HELP

# (label, quantize_model method, LLM.int8 threshold)
ROWS = {
    "fp32": ("fp32", 6.0),
    "llm-int8": ("llm-int8", 6.0),
    "llm-int8-nodecomp": ("llm-int8", 0.0),
    "int8": ("int8", 6.0),
    "nf4": ("nf4", 6.0),
    "nf4-cal": ("nf4", 6.0),          # "-cal": block scales weighted by calibration activations (nf4: + AWQ)
    "q4_0": ("q4_0", 6.0),
    "q4_0-cal": ("q4_0", 6.0),
    "q4_1": ("q4_1", 6.0),
    "q4_0-tuned": ("q4_0", 6.0),      # "-cal", then --tune-steps of scale tuning (lmforge.quant.tune); not by default
    "nf4-tuned": ("nf4", 6.0),
}
DEFAULT_ROWS = [label for label in ROWS if not label.endswith("-tuned")]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("The quantization lab: LLM.int8() outlier features in a model's activations, and the "
                          "held-out perplexity of fp32 vs LLM.int8() (with and without the decomposition) vs "
                          "weight-only int8 / NF4 / Q4_0. Writes OUT/report.md and OUT/outliers.png.")
    parser.formatter_class = HelpFormatter
    parser.epilog = "example:\n  lmforge quantize --model smollm2-135m-instruct --out runs/quant-lab"
    parser.add_argument("--model", default="smollm2-135m-instruct", metavar="REF", help="the model to study")
    parser.add_argument("--out", default="runs/quant-lab", help="directory for report.md and outliers.png")
    parser.add_argument("--threshold", type=float, default=6.0, help="LLM.int8() outlier threshold |x| >= T")
    parser.add_argument("--census-tokens", type=int, default=512, help="held-out tokens the outlier census reads")
    parser.add_argument("--ppl-tokens", type=int, default=1025, help="held-out tokens for perplexity (windows of 256)")
    parser.add_argument("--methods", default=",".join(DEFAULT_ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--calibrate", type=int, default=4096, metavar="TOKENS",
                        help="tokens of --calibration-text whose activations weight the rounding of the -cal rows")
    parser.add_argument("--calibration-text", default="wiki", metavar="TEXT", help=CALIBRATION_TEXT_HELP)
    parser.add_argument("--tune-steps", type=int, default=30, metavar="STEPS",
                        help="steps of scale tuning for the -tuned rows, on the --calibrate tokens "
                             "(lmforge.quant.tune)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.set_defaults(func=run)


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ROWS]
    if unknown or not methods:
        raise UserError(f"unknown --methods {', '.join(unknown) or '(none)'}; choose from {', '.join(ROWS)}")
    return methods


def run(args: argparse.Namespace) -> int:
    import torch

    from ..io import ensure_writable_dir, write_text_atomic
    from ..model.loading import load
    from .lab import heldout_shakespeare_ids, outlier_census, perplexity, quantized_copy

    methods = _methods(args.methods)
    if args.threshold <= 0:
        raise UserError(f"--threshold {args.threshold} must be above 0; use 6.0 (LLM.int8()'s default)")
    if args.tune_steps < 1 and any(label.endswith("-tuned") for label in methods):
        raise UserError(f"--tune-steps {args.tune_steps} is below 1; the -tuned rows need e.g. 30")
    if args.census_tokens < 1 or args.ppl_tokens < 2:
        raise UserError("--census-tokens must be >= 1 and --ppl-tokens >= 257 (one window of 256 + 1)")
    if args.threads is not None:
        torch.set_num_threads(max(args.threads, 1))
    out = ensure_writable_dir(args.out)
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise UserError(f"model '{args.model}' has no tokenizer; pass a trained model, an HF dir or a .gguf file")
    model.eval()
    ids = heldout_shakespeare_ids(tokenizer, max(args.census_tokens, args.ppl_tokens))
    print(f"outlier census on {args.census_tokens} held-out tokens ...", file=sys.stderr)
    census = outlier_census(model, ids[: args.census_tokens], args.threshold)
    calibration = None
    if any(label.endswith(("-cal", "-tuned")) for label in methods):
        from .calibrate import calibration_ids

        calibration = calibration_ids(tokenizer, args.calibrate, args.calibration_text)
    results = []
    for label in methods:
        method, threshold = ROWS[label]
        threshold = args.threshold if threshold else 0.0
        start = time.perf_counter()
        calibrated = label.endswith(("-cal", "-tuned"))
        quantized = quantized_copy(model, method, threshold, calibration if calibrated else None,
                                   tune_steps=args.tune_steps if label.endswith("-tuned") else 0)
        ppl = perplexity(quantized, ids[: args.ppl_tokens])
        results.append((label, ppl))
        print(f"{label:<18} perplexity {ppl:8.3f}  ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    report = render_report(args, census, results)
    write_text_atomic(out / "report.md", report)
    if census.column_max is not None:
        draw_outliers(census, out / "outliers.png")
    print(report)
    print(f"wrote {out / 'report.md'} and {out / 'outliers.png'}", file=sys.stderr)
    return 0


def render_report(args: argparse.Namespace, census, results: list[tuple[str, float]]) -> str:
    lines = [f"# Quantization lab: {args.model}", "",
             f"Outlier census: inputs of every Linear on {args.census_tokens} held-out Shakespeare tokens, "
             f"threshold |x| >= {census.threshold:g}.", "",
             "| layer input | width | outlier dims | first dims | tokens with an outlier | max abs x |",
             "|---|---:|---:|---|---:|---:|"]
    for layer in census.layers:
        first = ", ".join(map(str, layer.columns[:6])) + (" ..." if len(layer.columns) > 6 else "")
        lines.append(f"| {layer.name} | {layer.in_features} | {len(layer.columns)} | {first} | "
                     f"{layer.tokens_with_outlier}/{layer.tokens} | {layer.max_abs:.1f} |")
    hit = [layer for layer in census.layers if layer.columns]
    lines += ["", f"{len(hit)} of {len(census.layers)} Linear inputs have at least one value with "
              f"|x| >= {census.threshold:g}."]
    if census.systematic:
        dims = ", ".join(f"{d} ({share:.0%} of layers, up to {tok:.0%} of tokens)" for d, share, tok in census.systematic)
        lines.append(f"Systematic outlier features (>= 25% of layers and >= 6% of tokens, as in LLM.int8()): {dims}.")
    else:
        lines.append("No hidden dimension is an outlier in >= 25% of the qkv/gate_up inputs and >= 6% of tokens "
                     "(LLM.int8()'s criterion for systematic outliers, which emerge at ~6.7B parameters).")
    if census.top_dims:
        dims = ", ".join(f"{d} ({n}/{census.reader_layers} inputs, up to {tok:.0%} of tokens)"
                         for d, n, tok in census.top_dims)
        lines.append(f"Hidden dims most often over the threshold at the qkv/gate_up inputs: {dims}.")
    base = dict(results).get("fp32")
    lines += ["", f"Held-out perplexity ({args.ppl_tokens} tokens, windows of 256):", "",
              "| method | perplexity | vs fp32 |", "|---|---:|---:|"]
    for label, ppl in results:
        ratio = f"{ppl / base:.4f}" if base else "-"
        lines.append(f"| {label} | {ppl:.3f} | {ratio} |")
    if any(label.endswith("-cal") for label, _ in results):
        lines += ["", f"-cal: the same format, each block's scale chosen for the smallest rounding error weighted "
                  f"by the inputs' mean square on {args.calibrate} tokens of '{args.calibration_text}' "
                  "(lmforge.quant.calibrate); "
                  "nf4-cal also folds AWQ channel scales into the norms and rows first (lmforge.quant.scaling)."]
    if any(label.endswith("-tuned") for label, _ in results):
        lines += ["", f"-tuned: the -cal row, then {args.tune_steps} steps training every block scale (the codes "
                  f"fixed) so the quantized model's next-token distributions match fp32's on those {args.calibrate} "
                  "tokens (forward KL; lmforge.quant.tune)."]
    return "\n".join(lines) + "\n"


def draw_outliers(census, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io import atomic_path

    heat = census.column_max.clamp(min=1e-3).log10().numpy()
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(heat, aspect="auto", cmap="magma", interpolation="nearest")
    axes.set_xlabel("hidden dimension")
    axes.set_ylabel("qkv / gate_up input, by layer")
    axes.set_title(f"log10 max |x| per hidden dim; outliers: |x| >= {census.threshold:g}")
    figure.colorbar(image, ax=axes)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
