"""`lmforge toolformer`: the Toolformer lab (lmforge.labs.toolformer) from a recipe."""
from __future__ import annotations

import argparse

from ..cli import HelpFormatter

EXAMPLE = """lmforge toolformer --config toolformer-smollm2                 # ~10 minutes on 2 CPU cores
  lmforge toolformer --config toolformer-smollm2 tau=0.5 sft_steps=60
  lmforge toolformer train_problems=16 eval_problems=8 sft_steps=4   # a quick look"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Toolformer's self-supervised tool-use recipe: the model samples calculator calls in\n"
                          "its own training texts, the calls whose results lower the loss of the following\n"
                          "tokens by at least tau are kept, and the model is fine-tuned on them (lmforge sft).\n"
                          "Reports held-out accuracy without tools, with tools at inference only, and after\n"
                          "the fine-tuning (report.md, report.json, accuracy.png in out_dir/name).")
    parser.formatter_class = HelpFormatter
    parser.epilog = f"example:\n  {EXAMPLE}"
    parser.add_argument("--config", default=None, metavar="RECIPE", help="a YAML recipe (e.g. toolformer-smollm2)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. tau=0.5")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .toolformer import load_toolformer_config, run_toolformer

    report = run_toolformer(load_toolformer_config(args.config, args.overrides))
    out = f"{report['config']['out_dir']}/{report['config']['name']}"
    print(f"accuracy: without tools {report['accuracy_without_tools']:.1%}, tools at inference "
          f"{report['accuracy_tools_at_inference']:.1%}, after Toolformer "
          + ("n/a" if report['accuracy_after_toolformer'] is None else f"{report['accuracy_after_toolformer']:.1%}")
          + f"; calls kept {report['filter'].get('kept')} of {report['filter'].get('executed')}")
    print(f"report: {out}/report.md")
    return 0
