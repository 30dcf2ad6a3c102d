"""Where a training step's time goes: torch.profiler op counts and time shares, by kind of op.

For the bf16 question (what limits MFU once matmuls run on native bf16 hardware, AMX or
AVX512-BF16), this profiles lmforge's real `Trainer.train_step` on the GPT-2 shapes of
bench_train.py in fp32 and bf16 autocast, groups the ops (matmuls, attention, norms, softmax and
loss, optimizer, dtype casts, other element-wise), and projects the non-matmul share for a CPU
whose bf16 matmuls are `--matmul-speedup` times faster than the fp32 ones measured here (the
issue's AMX CPU: 2.8 TFLOP/s bf16 vs 0.42 fp32, 6.7x). On a CPU without native bf16 the bf16
profile is dominated by emulated matmuls; the op counts and the non-matmul times still show what
the bf16 path adds (casts, upcasts in norms and the loss). Ends with one JSON line.

    python benchmarks/profile_train.py [--batch-size 8] [--seq-len 256] [--steps 2]
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile

import torch
from bench_model import add_shape_arguments, model_configs, peaks
from bench_train import lmforge_step

KINDS = (  # (kind, substrings of aten op names), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mm")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("optimizer", ("_foreach_", "adam")),
    ("cast", ("aten::to", "aten::_to_copy", "aten::copy_")),
    ("norm", ("rsqrt", "aten::pow", "aten::mean", "layer_norm", "rms_norm")),
    ("softmax/loss", ("softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("embedding", ("embedding",)),
)


def kind_of(name: str) -> str:
    for kind, patterns in KINDS:
        if any(pattern in name for pattern in patterns):
            return kind
    return "other element-wise"


def profile(step, steps: int) -> tuple[dict[str, float], dict[str, int], float]:
    """Self CPU time (s) and call counts per kind over `steps` profiled steps, and the wall time per step."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()                                           # warm-up (allocations, first-call overheads)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    seconds: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    others: dict[str, float] = {}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        kind = kind_of(event.key)
        seconds[kind] += event.self_cpu_time_total / 1e6 / steps
        counts[kind] += event.count // steps
        if kind == "other element-wise":
            others[event.key] = event.self_cpu_time_total / 1e6 / steps
    top = sorted(others, key=others.get, reverse=True)[:6]
    print("largest other ops: " + ", ".join(f"{name[6:]} {others[name] * 1e3:.1f} ms" for name in top))
    return dict(seconds), dict(counts), sum(seconds.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--matmul-speedup", type=float, default=6.7,
                        help="bf16 / fp32 matmul speed of the CPU to project for (AMX: ~6.7)")
    args = parser.parse_args()
    peak = peaks()
    config = model_configs(args)["gpt2"]
    figures: dict = {"benchmark": "profile_train", "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "peak_gflops_fp32": round(peak["fp32"] / 1e9, 1), "peak_gflops_bf16": round(peak["bf16"] / 1e9, 1),
                     "bf16_emulated": peak["bf16"] < peak["fp32"]}
    with tempfile.TemporaryDirectory() as run_dir:
        for precision in ("fp32", "bf16"):
            batch = 1 if precision == "bf16" and figures["bf16_emulated"] else args.batch_size
            torch.manual_seed(0)
            ids = torch.randint(0, args.vocab_size, (batch, args.seq_len + 1))
            seconds, counts, total = profile(lmforge_step(config, ids, precision, run_dir, "adamw"), args.steps)
            print(f"\n{precision}, B={batch}: {total * 1e3:.0f} ms of aten self time per step")
            print(f"{'kind':<20}{'ms/step':>10}{'share':>8}{'calls':>8}")
            for kind in sorted(seconds, key=seconds.get, reverse=True):
                print(f"{kind:<20}{seconds[kind] * 1e3:>10.1f}{seconds[kind] / total:>8.1%}{counts[kind]:>8}")
            figures[precision] = {"ms_per_step": round(total * 1e3, 1),
                                  "share": {k: round(v / total, 4) for k, v in seconds.items()},
                                  "calls": counts}
            if precision == "fp32":
                # If the matmuls (and attention's matmuls) ran --matmul-speedup times faster in bf16
                # while everything else stayed as it is in fp32:
                fast = seconds.get("matmul", 0.0) / args.matmul_speedup + seconds.get("attention", 0.0) / args.matmul_speedup
                rest = total - seconds.get("matmul", 0.0) - seconds.get("attention", 0.0)
                figures["projected_non_matmul_share_native_bf16"] = round(rest / (rest + fast), 4)
                print(f"projection: with matmuls {args.matmul_speedup:g}x faster (native bf16) and the rest as in fp32, "
                      f"non-matmul ops would take {rest / (rest + fast):.0%} of the step")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
