"""`lmforge sft`: a thin layer over `lmforge.train.sft.sft`."""
from __future__ import annotations

import argparse

from ..cli import HelpFormatter

EXAMPLE = """lmforge sft --config sft-smollm2-countdown                 # SmolLM2 on a reasoning-gym task
  lmforge sft --config sft-tiny-chatterbot max_steps=50        # a tiny model, one minute
  lmforge sft --config sft-smollm2-chat data=my_chats.jsonl format=sharegpt
  lmforge sft --config sft-smollm2-countdown --resume          # continue runs/sft-smollm2-countdown
  torchrun --nproc_per_node=2 -m lmforge sft --config sft-tiny-chatterbot"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Supervised fine-tuning on chat data: any loadable model (SmolLM2, a pretraining run,\n"
                          "an HF directory, a GGUF) learns the assistant replies of conversations (alpaca, dolly,\n"
                          "sharegpt, OpenAI messages, oasst, prompt/completion files, or the built-in sharegpt,\n"
                          "chatterbot and reasoning-gym:TASK data). The run holds checkpoints, metrics, samples,\n"
                          "report.md (before/after) and a model that `lmforge chat`, `serve` and `convert` take.")
    parser.epilog = f"example:\n  {EXAMPLE}"
    parser.formatter_class = HelpFormatter
    parser.add_argument("--config", metavar="RECIPE",
                        help="a YAML recipe, or the name of one in configs/ (e.g. sft-smollm2-countdown)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings that override the recipe, e.g. max_steps=50 lr=1e-5 packing=false")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without training")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import to_dict
    from .sft import load_sft_config

    config = load_sft_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    from .sft import sft

    sft(config, resume=args.resume)
    return 0
