"""`lmforge data prepare` (corpus -> token shards) and `lmforge data stats` (what the shards hold)."""
from __future__ import annotations

import argparse

from ..cli import add_subparser
from ..errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="action", required=True)

    prepare = add_subparser(
        subparsers, "prepare",
        "tokenize a corpus into DIR/train.bin, DIR/val.bin and DIR/meta.json (whole documents held out for val)",
        "lmforge data prepare --corpus shakespeare --tokenizer artifacts/tokenizer --out data/shakespeare")
    prepare.add_argument("--corpus", required=True,
                         help="'shakespeare' (built in), a .txt/.jsonl/.parquet file, a directory of them, "
                              "a `datasets` save_to_disk directory, or a dataset name in the local HF cache")
    prepare.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. from `lmforge tokenizer train`)")
    prepare.add_argument("--out", required=True, help="output directory for the shards")
    prepare.add_argument("--val-fraction", type=float, default=0.05,
                         help="fraction of documents held out for validation (at least one)")
    prepare.add_argument("--text-field", "--text-column", dest="text_field", default="text",
                         help="JSONL field, Parquet column or dataset column holding the text")
    prepare.add_argument("--separator", default=None,
                         help=r"split text files into documents at this string; escapes such as \n are understood "
                              "(default: one document per file)")
    prepare.add_argument("--dataset-split", default="train", help="split of a `datasets` DatasetDict to read")
    prepare.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: cores - 1, at most 8)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(func=run_prepare)

    stats = add_subparser(subparsers, "stats", "print the figures in a shard directory's meta.json",
                          "lmforge data stats --data data/shakespeare")
    stats.add_argument("--data", required=True, help="shard directory (written by `lmforge data prepare`)")
    stats.set_defaults(func=run_stats)


def unescape(text: str) -> str:
    r"""Turn shell-typed escapes ('\n', '\t', '\u2028') into the characters, keeping other text as is."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise UserError(f"--separator {text!r} has a broken escape sequence ({error.reason}); "
                        r"write it like '\n\n'") from None


def run_prepare(args: argparse.Namespace) -> int:
    from .shards import describe_shards, prepare_shards

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    separator = unescape(args.separator) if args.separator is not None else None
    prepare_shards(args.corpus, args.tokenizer, args.out, args.val_fraction, text_field=args.text_field,
                   separator=separator, dataset_split=args.dataset_split, num_workers=args.workers,
                   progress=not args.quiet)
    print(describe_shards(args.out))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from .shards import describe_shards

    print(describe_shards(args.data))
    return 0
