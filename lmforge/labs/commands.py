"""`lmforge inspect attention|io`: look inside a model (ours, or an imported GPT-2/BERT/Llama)."""
from __future__ import annotations

import argparse
import json
import warnings

from ..cli import add_subparser


def configure(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="action", required=True)
    attention = add_subparser(
        subparsers, "attention", "draw per-head attention heatmaps of one layer for a text (PNG)",
        'lmforge inspect attention --model smollm2-135m-instruct --text "The cat sat on the mat" --layer 3 --out attn.png')
    _add_model_arguments(attention)
    attention.add_argument("--layer", type=int, default=-1, help="layer to draw (0-based; -1 is the last)")
    attention.add_argument("--out", default="attn.png", help="PNG file to write")
    attention.set_defaults(func=run_attention)

    io = add_subparser(
        subparsers, "io", "show input_ids, attention_mask, CLM/MLM labels and top-k predictions for a text",
        'lmforge inspect io --model minilm-l6 --text "Paris is the [MASK] of France."')
    _add_model_arguments(io)
    io.add_argument("--top-k", type=int, default=5, help="predictions shown per position")
    io.add_argument("--mask-prob", type=float, default=0.15, help="share of tokens the MLM example masks")
    io.add_argument("--seed", type=int, default=0, help="seed of the MLM example's masking")
    io.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    io.set_defaults(func=run_io)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="run/checkpoint dir, HF dir, .gguf file, bundled model or preset (with --tokenizer)")
    parser.add_argument("--text", required=True, help="the text to feed the model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (needed for presets)")


def _load(args: argparse.Namespace):
    from ..model.loading import load
    from .common import require_tokenizer

    with warnings.catch_warnings():
        # A BertModel's missing MLM head: `inspect io` says so in its notes; attention does not use it.
        warnings.simplefilter("ignore", UserWarning)
        model, tokenizer = load(args.model, tokenizer=args.tokenizer)
    return model, require_tokenizer(tokenizer, args.model)


def _console():
    from rich.console import Console

    console = Console()
    # Piped output would be squeezed into 80 columns; the tables read better wider.
    return console if console.is_terminal else Console(width=160)


def run_attention(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.table import Table

    from ..io import ensure_writable_dir
    from .attention import capture_attention, draw_attention_grid, pick_layer, summarize_heads
    from .common import encode_for_model, model_inputs, token_label

    ensure_writable_dir(Path(args.out).parent)    # before loading a model that may take a while
    model, tokenizer = _load(args)
    layer = pick_layer(model.config.n_layers, args.layer)
    ids = encode_for_model(model, tokenizer, args.text)
    probs = capture_attention(model, model_inputs(model, ids))[layer][0]          # [H, T, T]
    labels = [token_label(tokenizer, index) for index in ids]
    out = draw_attention_grid(probs, labels, args.out, title=f"{args.model}: layer {layer}")
    console = _console()
    table = Table(title=f"layer {layer}: where each head looks (share of queries whose strongest key is ...)",
                  header_style="bold")
    for column in ("head", "previous token", "first token", "itself", "entropy (bits)", "pattern"):
        table.add_column(column, justify="right" if column != "pattern" else "left")
    for summary in summarize_heads(probs):
        table.add_row(str(summary.head), f"{summary.previous_token:.0%}", f"{summary.first_token:.0%}",
                      f"{summary.self_token:.0%}", f"{summary.entropy:.2f}", summary.pattern)
    console.print(table)
    console.print(f"wrote {out} ({probs.shape[0]} heads x {len(ids)} tokens)", markup=False)
    return 0


def run_io(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from .model_io import inspect_io, render_io

    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, not {args.top_k}")
    if args.seed < 0:   # numpy's generators take non-negative seeds only
        raise UserError(f"--seed must be zero or positive, not {args.seed}")
    model, tokenizer = _load(args)
    report = inspect_io(model, tokenizer, args.text, top_k=args.top_k, mask_prob=args.mask_prob, seed=args.seed)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        render_io(report, _console(), tokenizer)
    return 0
