"""`lmforge pretrain`: a thin layer over `lmforge.train.pretrain`."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from ..cli import HelpFormatter

EXAMPLE = """lmforge pretrain --config shakespeare-gpt max_steps=500 lr=1e-3
  lmforge pretrain --config shakespeare-gpt --resume              # continue runs/shakespeare-gpt
  torchrun --nproc_per_node=2 -m lmforge pretrain --config shakespeare-gpt distributed=ddp"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Pretrain a GPT (causal LM) or BERT (masked LM) on token shards.\n"
                          "The run lives in OUT_DIR/NAME: config.yaml, metrics.jsonl, samples, checkpoints and\n"
                          "the final model. Settings come from the recipe, then key=value overrides (model.* for\n"
                          "the model; --print-config shows every key).")
    parser.epilog = f"example:\n  {EXAMPLE}"
    add_recipe_arguments(parser, "e.g. shakespeare-gpt, shakespeare-bert",
                         "lr=3e-4 model.n_layers=6 precision=bf16")
    parser.set_defaults(func=run)


def add_recipe_arguments(parser: argparse.ArgumentParser, recipes: str, overrides: str) -> None:
    """--config RECIPE, key=value overrides, --resume and --print-config: every training command's."""
    parser.formatter_class = HelpFormatter
    parser.add_argument("--config", metavar="RECIPE",
                        help=f"a YAML recipe, or the name of one in configs/ ({recipes})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"settings that override the recipe, e.g. {overrides}")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its latest checkpoint (same config; limits may be raised)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without training")


def run_recipe(args: argparse.Namespace, load_config: Callable[[Any, list[str]], Any],
               train: Callable[..., Any]) -> int:
    """Resolve the recipe + overrides; print it (--print-config) or train it."""
    from ..config import to_dict

    config = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    train(config, resume=args.resume)
    return 0


def run(args: argparse.Namespace) -> int:
    from .config import load_pretrain_config
    from .pretraining import pretrain

    return run_recipe(args, load_pretrain_config, pretrain)
