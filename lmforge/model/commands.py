"""`lmforge model info REF`: parameters, FLOPs per token, KV-cache and activation memory."""
from __future__ import annotations

import argparse

from ..cli import add_subparser


def configure(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="action", required=True)
    info = add_subparser(subparsers, "info", "parameter counts, FLOPs per token, memory and architecture of a model",
                         "lmforge model info gpt2-124m --context 1024")
    info.add_argument("ref", help="preset name, bundled model, HF directory, .gguf file or lmforge run/checkpoint")
    info.add_argument("--context", type=int, default=None, help="context length for FLOPs and memory (default: the model's)")
    info.add_argument("--batch-size", type=int, default=1, help="batch size for memory estimates")
    info.set_defaults(func=run_info)


def _check_positive(option: str, value: int | None, fallback: str) -> None:
    """Sizes below 1 would print negative or zero memory and FLOPs; None means "not given"."""
    if value is not None and value < 1:
        from ..errors import UserError

        raise UserError(f"{option} must be at least 1, not {value}; give a positive number {fallback}")


def run_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .info import activation_bytes, count_parameters, describe, flops_per_token, kv_cache_bytes
    from .loading import resolve_config

    _check_positive("--context", args.context, "or leave it out for the model's own context length")
    _check_positive("--batch-size", args.batch_size, "or leave it out for batch 1")
    config = resolve_config(args.ref)
    context = args.context if args.context is not None else config.max_seq_len   # 0 is refused, not "default"
    counts = count_parameters(config)
    console = Console()
    console.print(args.ref, style="bold", markup=False)   # a path may hold "[...]", which is not markup
    console.print(describe(config), markup=False)
    table = Table(show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("parameters (total)", f"{counts.total:,} ({counts.total / 1e6:.2f} M)")
    table.add_row("  embedding", f"{counts.embedding:,}")
    table.add_row("  non-embedding", f"{counts.non_embedding:,}")
    table.add_row(f"forward FLOPs / token @ {context}", f"{flops_per_token(config, context, training=False) / 1e6:,.1f} M")
    table.add_row(f"training FLOPs / token @ {context}", f"{flops_per_token(config, context) / 1e6:,.1f} M")
    if config.arch == "gpt":
        table.add_row(f"KV cache bf16 @ {context} x batch {args.batch_size}",
                      _human(kv_cache_bytes(config, context, args.batch_size)))
    table.add_row(f"activations bf16 @ {context} x batch {args.batch_size}",
                  _human(activation_bytes(config, context, args.batch_size)))
    table.add_row("weights fp32 / bf16", f"{_human(counts.total * 4)} / {_human(counts.total * 2)}")
    table.add_row("training state (fp32 weights + grads + AdamW)", _human(counts.total * 16))
    console.print(table)
    return 0


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TiB"
