"""`lmforge tokenizer train | encode | stats`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..cli import add_subparser
from ..errors import UserError
from .special_tokens import DEFAULT_SPECIAL_TOKENS

_PIECE_STYLES = ["on dark_blue", "on dark_green", "on dark_red", "on purple4", "on dark_orange3", "on grey30"]


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    train = add_subparser(actions, "train", "train a byte-level BPE tokenizer on text files",
                          "lmforge tokenizer train --input shakespeare --vocab-size 8192 --out artifacts/tokenizer")
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="UTF-8 text files or folders of .txt files (each file is a document); "
                            "'shakespeare' is the built-in corpus of 42 plays")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="total size: 256 byte tokens + merges + special tokens")
    train.add_argument("--special-tokens", nargs="*", default=list(DEFAULT_SPECIAL_TOKENS), metavar="TOKEN",
                       help="special tokens, never split or merged (give the flag alone for none)")
    train.add_argument("--pattern", default="gpt2", help="pre-tokenization regex: gpt2, gpt4 or a regex")
    train.add_argument("--split-digits", action="store_true", help="make every digit its own piece first")
    train.add_argument("--workers", type=int, default=None, help="processes for pre-tokenization (default: all cores)")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json + tokenizer_config.json")
    train.set_defaults(func=_train)

    encode = add_subparser(actions, "encode", "show how a tokenizer cuts a text: coloured pieces and ids",
                           "lmforge tokenizer encode --tokenizer artifacts/tokenizer \"To be, or not to be<|endoftext|>\"")
    encode.add_argument("text", help="the text to encode")
    encode.add_argument("--tokenizer", required=True, help="tokenizer directory (or .gguf, or 'smollm2' / 'minilm')")
    encode.add_argument("--no-special", action="store_true", help="encode special-token strings as plain text")
    encode.set_defaults(func=_encode)

    stats = add_subparser(actions, "stats", "bytes per token and vocabulary use on some text, optionally against another tokenizer",
                          "lmforge tokenizer stats --tokenizer artifacts/tokenizer --input shakespeare --compare smollm2")
    stats.add_argument("--tokenizer", required=True, help="tokenizer directory (or .gguf, or 'smollm2' / 'minilm')")
    stats.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text files, folders or 'shakespeare'")
    stats.add_argument("--compare", default=None, help="a second tokenizer to compare with")
    stats.set_defaults(func=_stats)


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Paths from --input: files, folders of .txt files, or 'shakespeare' (the built-in corpus)."""
    from ..assets import shakespeare_play_files

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if item == "shakespeare" and not path.exists():
            files.extend(shakespeare_play_files())
        elif path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise UserError(f"input folder '{path}' has no .txt files; give text files or a folder of them")
            files.extend(found)
        elif path.is_file():
            if path.stat().st_size == 0:
                raise UserError(f"input file '{path}' is empty; give a file with text in it")
            files.append(path)
        else:
            raise UserError(f"input '{path}' does not exist; give text files, folders, or 'shakespeare'")
    return files


def _train(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .train import train_bpe

    files = resolve_inputs(args.input)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        merges = progress.add_task("learning merges", total=max(args.vocab_size - 256 - len(args.special_tokens), 0))
        tokenizer = train_bpe(files, args.vocab_size, special_tokens=args.special_tokens, pattern=args.pattern,
                              split_digits=args.split_digits, num_workers=args.workers,
                              progress=lambda done: progress.update(merges, completed=done))
    seconds = time.perf_counter() - start
    out = tokenizer.save(args.out)
    print(f"trained on {len(files)} file(s) in {seconds:.2f} s: {len(tokenizer.merges)} merges, "
          f"{len(tokenizer.special_tokens)} special tokens, vocab_size {tokenizer.vocab_size}")
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the text ran out of pairs to merge before reaching --vocab-size {args.vocab_size}")
    print(f"saved {out / 'tokenizer.json'} (fingerprint {tokenizer.fingerprint()[:12]})")
    return 0


def _piece_text(data: bytes) -> str:
    """A token's bytes as readable text: partial UTF-8 as \\x.., newlines and tabs escaped."""
    return data.decode("utf-8", errors="backslashreplace").replace("\n", "\\n").replace("\t", "\\t")


def _encode(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from .loading import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenizer.encode(args.text, allow_special=not args.no_special)
    console = Console()
    # In a terminal, background colours tell the pieces apart; in a pipe, a separator does.
    separator = "" if console.is_terminal else "|"
    pieces = Text(separator)
    for position, index in enumerate(ids):
        pieces.append(_piece_text(tokenizer.id_to_bytes(index)), style=_PIECE_STYLES[position % len(_PIECE_STYLES)])
        pieces.append(separator)
    console.print(pieces, soft_wrap=True)
    console.print(f"{len(ids)} tokens, {len(args.text.encode('utf-8'))} bytes")
    console.print(ids, soft_wrap=True)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .loading import load_tokenizer
    from .stats import measure

    files = resolve_inputs(args.input)
    names = [args.tokenizer] + ([args.compare] if args.compare else [])
    results = [measure(load_tokenizer(name), files, name) for name in names]
    table = Table(title=f"{len(files)} file(s), {results[0].num_bytes:,} bytes")
    for column in ("tokenizer", "vocab size", "tokens", "bytes/token", "ids used", "vocab used"):
        table.add_column(column, justify="left" if column == "tokenizer" else "right")
    for result in results:
        table.add_row(escape(result.name), f"{result.vocab_size:,}", f"{result.num_tokens:,}", f"{result.bytes_per_token:.3f}",
                      f"{result.distinct_ids:,}", f"{100 * result.vocab_used:.1f}%")
    console = Console()
    console.print(table)
    if len(results) == 2:
        first, second = results
        console.print(f"{first.name} needs {first.num_tokens / max(second.num_tokens, 1):.3f}x the tokens of {second.name}",
                      soft_wrap=True, markup=False)   # names are paths: "[...]" in them is not markup
    return 0
