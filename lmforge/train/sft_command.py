"""`lmforge sft`: a thin layer over `lmforge.train.sft.sft`."""
from __future__ import annotations

import argparse

from .commands import add_recipe_arguments, run_recipe

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
    add_recipe_arguments(parser, "e.g. sft-smollm2-countdown, sft-smollm2-chat, sft-tiny-chatterbot",
                         "max_steps=50 lr=1e-5 packing=false")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .sft import load_sft_config, sft

    return run_recipe(args, load_sft_config, sft)
