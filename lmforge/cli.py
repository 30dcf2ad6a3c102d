"""The `lmforge` command line: a thin layer over the Python API.

Commands are listed by roadmap stage. Each command lives in a small `commands.py` module next
to the code it drives and is imported only when used, so `lmforge --help` stays instant.
A command module exposes `configure(parser)`, which adds arguments and sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    summary: str


# (roadmap stage, commands). The order here is the order of `lmforge --help`.
STAGES: list[tuple[str, list[Command]]] = [
    ("Stage 1 - attention and transformers", [
        Command("inspect", "lmforge.labs.commands", "attention heatmaps and a model's inputs/outputs"),
        Command("model", "lmforge.model.commands", "parameter counts, FLOPs and memory of a model"),
    ]),
    ("Stage 2 - tokenizers, data, GPT/BERT", [
        Command("tokenizer", "lmforge.tokenizer.commands", "train, inspect and compare byte-level BPE tokenizers"),
        Command("data", "lmforge.data.commands", "turn a corpus into token shards for training"),
        Command("convert", "lmforge.model.convert_command", "convert between lmforge, Hugging Face and GGUF formats"),
    ]),
    ("Stage 3 - pretraining", [
        Command("pretrain", "lmforge.train.commands", "pretrain a GPT (causal LM) or BERT (masked LM)"),
        Command("speedrun", "lmforge.train.speedrun", "tokenizer -> shards -> pretrain -> eval -> report, on a CPU"),
        Command("runs", "lmforge.track.commands", "list runs and plot their curves"),
    ]),
    ("Stage 4 - fine-tuning", [
        Command("sft", "lmforge.train.sft_command", "supervised fine-tuning on chat data (assistant-only loss, packing)"),
        Command("zero", "lmforge.train.zero_command", "peak memory per rank under DDP and FSDP2 (ZeRO stages 0-3)"),
    ]),
    ("Stage 5 - alignment", [
        Command("align", "lmforge.align.commands", "preference pairs, reward models, the DPO family (DPO, IPO, SimPO, ORPO, KTO), GRPO/RLOO, PPO, Constitutional AI"),
    ]),
    ("Stage 6 - evaluation, inference and deployment", [
        Command("eval", "lmforge.eval.commands", "benchmarks: perplexity, multiple choice, GSM8K, HumanEval, lm-eval tasks"),
        Command("arena", "lmforge.eval.arena_command", "LMSYS-style battles between two models, Elo and Bradley-Terry"),
        Command("leaderboard", "lmforge.eval.leaderboard_command", "an Open-LLM-style table of every evaluated model"),
        Command("generate", "lmforge.infer.commands", "generate text from a prompt"),
        Command("chat", "lmforge.infer.chat_command", "chat with a model in the terminal"),
        Command("serve", "lmforge.serve.commands", "OpenAI-compatible HTTP API with continuous batching"),
        Command("web", "lmforge.serve.web_command", "Gradio web chat demo"),
        Command("quantize", "lmforge.quant.commands", "LLM.int8 outliers, int8/NF4/Q4_0 weights and their perplexity"),
    ]),
    ("Research directions", [
        Command("rag", "lmforge.rag.commands", "retrieval-augmented generation: index a corpus, ask with citations"),
        Command("toolformer", "lmforge.labs.toolformer_command", "tool use: calculator/retrieval calls, Toolformer's data filter"),
        Command("metaicl", "lmforge.labs.metaicl_command", "MetaICL: meta-train on k-shot episodes, test on held-out tasks"),
    ]),
]

COMMANDS = {command.name: command for _, commands in STAGES for command in commands}


def _available(command: Command) -> bool:
    try:
        return importlib.util.find_spec(command.module) is not None
    except ModuleNotFoundError:  # its package is not there (yet)
        return False


def top_level_help() -> str:
    lines = [
        "usage: lmforge COMMAND [options]   (lmforge COMMAND --help for details and an example)",
        "",
        "lmforge: a hands-on LLM lab, from BPE to a served chat model.",
    ]
    for stage, commands in STAGES:
        shown = [c for c in commands if _available(c)]
        if not shown:
            continue
        lines += ["", f"{stage}:"]
        lines += [f"  {c.name:<11} {c.summary}" for c in shown]
    lines += ["", "Start with `make demo` (runs `lmforge speedrun`)."]
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep example blocks as written and show defaults."""


def add_subparser(subparsers, name: str, description: str, example: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=description, description=description,
                                 epilog=f"example:\n  {example}", formatter_class=HelpFormatter)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (servers warn before binding anything else)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(port: int) -> None:
    """A TCP port a server can listen on, or a UserError that says so."""
    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a TCP port; use a number from 1 to 65535")


def build_command_parser(name: str) -> argparse.ArgumentParser:
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    parser = argparse.ArgumentParser(prog=f"lmforge {name}", description=command.summary,
                                     formatter_class=HelpFormatter)
    module.configure(parser)
    if parser.epilog is None:
        # A command with actions (`lmforge tokenizer`): its help ends with each action's example.
        examples = [sub.epilog.removeprefix("example:\n") for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction)
                    for sub in action.choices.values() if sub.epilog]
        parser.epilog = "examples:\n" + "\n".join(examples) if examples else None
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(top_level_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"lmforge {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS or not _available(COMMANDS[name]):
        print(f"lmforge: error: unknown command '{name}'; run `lmforge --help` to see the commands", file=sys.stderr)
        return 2
    try:
        parser = build_command_parser(name)
        args = parser.parse_args(argv[1:])
        if not hasattr(args, "func"):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"lmforge {name}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `lmforge ... | head` closes stdout early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
