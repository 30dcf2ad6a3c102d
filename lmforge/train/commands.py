"""`lmforge pretrain`: a thin layer over `lmforge.train.pretrain`."""
from __future__ import annotations

import argparse

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
    parser.formatter_class = HelpFormatter
    parser.add_argument("--config", metavar="RECIPE",
                        help="a YAML recipe, or the name of one in configs/ (e.g. shakespeare-gpt, shakespeare-bert)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings that override the recipe, e.g. lr=3e-4 model.n_layers=6 precision=bf16")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its latest checkpoint (same config; limits may be raised)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without training")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import to_dict
    from .config import load_pretrain_config

    config = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    from .pretraining import pretrain

    pretrain(config, resume=args.resume)
    return 0
