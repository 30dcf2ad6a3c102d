"""Speedrun quality: validation bits per byte on the held-out plays after the same wall-clock budget,
for the modern recipe (RMSNorm, RoPE, SwiGLU, GQA) and the GPT-2 recipe (LayerNorm, learned
positions, GELU) at the same size, trained one after the other on this machine. Ends with one JSON line.

    python benchmarks/bench_speedrun.py [--minutes 5]
"""
from __future__ import annotations

import argparse
import json
import time

from lmforge.train.speedrun import SpeedrunConfig, speedrun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--out-dir", default="runs")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for recipe in ("modern", "gpt2"):
        result = speedrun(SpeedrunConfig(minutes=args.minutes, recipe=recipe, out_dir=args.out_dir,
                                         name=f"bench-speedrun-{recipe}-{stamp}"))
        results[recipe] = result.figures

    print(f"speedrun quality after {args.minutes:g} min of training on Shakespeare (validation: held-out plays)")
    print(f"{'recipe':<8}{'params':>9}{'steps':>7}{'tokens':>11}{'tokens/s':>10}{'val loss':>10}{'val bpb':>9}")
    for recipe, figures in results.items():
        print(f"{recipe:<8}{figures['parameters'] / 1e6:>8.2f}M{figures['steps']:>7}{figures['tokens_seen']:>11,}"
              f"{figures['tokens_per_s']:>10,.0f}{figures['val_loss']:>10.4f}{figures['val_bpb']:>9.4f}")
    modern, gpt2 = results["modern"]["val_bpb"], results["gpt2"]["val_bpb"]
    print(f"modern recipe {'wins' if modern < gpt2 else 'does NOT win'}: {modern:.4f} vs {gpt2:.4f} bpb")
    print(json.dumps({"benchmark": "speedrun_quality", "minutes": args.minutes,
                      "modern_val_bpb": modern, "gpt2_val_bpb": gpt2, "bpb_ratio_modern_over_gpt2": round(modern / gpt2, 4),
                      "modern_tokens": results["modern"]["tokens_seen"], "gpt2_tokens": results["gpt2"]["tokens_seen"],
                      "modern_tokens_per_s": results["modern"]["tokens_per_s"],
                      "gpt2_tokens_per_s": results["gpt2"]["tokens_per_s"], "modern_wins": modern < gpt2}))


if __name__ == "__main__":
    main()
