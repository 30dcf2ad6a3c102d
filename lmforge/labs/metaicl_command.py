"""`lmforge metaicl`: the MetaICL lab (lmforge.labs.metaicl) from a recipe."""
from __future__ import annotations

import argparse

from ..cli import HelpFormatter

EXAMPLE = """lmforge metaicl --config metaicl-smollm2                    # ~10 minutes on 2 CPU cores
  lmforge metaicl --config metaicl-smollm2 train_k=8 sft_steps=80
  lmforge metaicl pool=12 train_episodes=16 eval_queries=2 sft_steps=2 shots=[0,1]   # a quick look"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("MetaICL: meta-train on k-shot episodes of many reasoning-gym task families (lmforge sft),\n"
                          "then measure k-shot accuracy on held-out families against the base model and plain\n"
                          "multi-task SFT, for k = 0, 1, 4, 8 (report.md, report.json, accuracy_vs_k.png).")
    parser.formatter_class = HelpFormatter
    parser.epilog = f"example:\n  {EXAMPLE}"
    parser.add_argument("--config", default=None, metavar="RECIPE", help="a YAML recipe (e.g. metaicl-smollm2)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train_k=8")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .metaicl import load_metaicl_config, run_metaicl

    report = run_metaicl(load_metaicl_config(args.config, args.overrides))
    for label, values in report["mean_accuracy"].items():
        print(f"{label}: " + ", ".join(f"k={k} {value:.1%}" for k, value in values.items()))
    print(f"report: {report['config']['out_dir']}/{report['config']['name']}/report.md")
    return 0
