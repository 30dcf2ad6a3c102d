"""`lmforge runs list` and `lmforge runs plot`."""
from __future__ import annotations

import argparse

from ..cli import add_subparser
from ..errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")

    list_parser = add_subparser(subparsers, "list", "table of the runs under a folder: model, steps, losses, status",
                                "lmforge runs list --root runs")
    list_parser.add_argument("--root", default="runs", help="folder that holds the run directories")
    list_parser.set_defaults(func=run_list)

    plot_parser = add_subparser(subparsers, "plot", "plot loss, learning rate and throughput of one or more runs",
                                "lmforge runs plot runs/tiny-gpt runs/tiny-gpt-rope --out compare.png")
    plot_parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory, or a run name under --root")
    plot_parser.add_argument("--out", required=True, help="figure to write (.png, .pdf or .svg)")
    plot_parser.add_argument("--root", default="runs", help="folder that holds the run directories")
    plot_parser.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis of every panel")
    plot_parser.add_argument("--title", default=None, help="figure title")
    plot_parser.set_defaults(func=run_plot)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .progress import format_count
    from .runs import list_runs

    summaries = list_runs(args.root)
    console = Console()
    if not console.is_terminal:
        # Piped output has no width to respect; rich's default of 80 columns would wrap the table.
        console.width = max(console.width, 160)
    if not summaries:
        console.print(f"no runs under '{args.root}' (a run is a folder with a metrics.jsonl)", markup=False)
        return 0
    # Names and models come from folder names and config files: "[x]" in them is text, not rich markup.
    table = Table(title=escape(f"runs under {args.root}"))
    for column in ("run", "objective", "model", "step", "loss", "best val", "val bpb", "tokens", "status"):
        numeric = column in ("step", "loss", "best val", "val bpb", "tokens")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for run in summaries:
        table.add_row(
            escape(run.name), escape(run.objective or "-"), escape(run.model or "-"),
            "-" if run.last_step is None else str(run.last_step),
            _fmt(run.last_loss), _fmt(run.best_val_loss), _fmt(run.val_bpb),
            "-" if run.tokens_seen is None else format_count(run.tokens_seen),
            run.status,
        )
    console.print(table)
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from .runs import plot_runs, resolve_run

    run_dirs = [resolve_run(ref, args.root) for ref in args.runs]
    if len({run.resolve() for run in run_dirs}) < len(run_dirs):
        raise UserError("the same run was given twice; list each run once")
    figure = plot_runs(run_dirs, args.out, x=args.x, title=args.title)
    print(f"wrote {args.out} ({len(run_dirs)} run{'s' if len(run_dirs) > 1 else ''}, "
          f"{sum(ax.get_visible() for ax in figure.axes)} panels)")
    return 0
