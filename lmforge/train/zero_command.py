"""`lmforge zero`: ZeRO stages made visible (peak memory per rank under DDP and FSDP2), and a
DeepSpeed ds_config.json written from a recipe."""
from __future__ import annotations

import argparse
import platform
import sys

EXAMPLE = """lmforge zero --model small                      # 2 gloo processes: DDP, ZeRO-2/3-like FSDP2, CPU offload
  lmforge zero --model llama-135m --strategies ddp,zero3 --json zero.json
  lmforge zero --ds-config ds_config.json --stage 3 --config sft-smollm2-countdown   # for DeepSpeed on GPUs"""


def configure(parser: argparse.ArgumentParser) -> None:
    from .zero import STRATEGIES, ZeroConfig

    defaults = ZeroConfig()
    parser.description = ("Train the same model for a few steps on N gloo processes under DDP (ZeRO-0), FSDP2\n"
                          "without resharding (ZeRO-2-like), FSDP2 with resharding (ZeRO-3-like) and FSDP2 with\n"
                          "CPU offload; print each rank's parameter + gradient + optimizer-state bytes and peak\n"
                          "RSS beside what the ZeRO paper predicts. --ds-config writes a DeepSpeed config instead.")
    parser.epilog = f"example:\n  {EXAMPLE}"
    parser.add_argument("--model", default=defaults.model, help="a model preset (random weights), e.g. small, llama-135m")
    parser.add_argument("--world-size", type=int, default=defaults.world_size, help="processes (gloo)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated: " + ", ".join(STRATEGIES))
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per strategy")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the measurements as JSON")
    parser.add_argument("--ds-config", default=None, metavar="PATH",
                        help="write a DeepSpeed ds_config.json from --config's training settings and exit")
    parser.add_argument("--stage", type=int, choices=(2, 3), default=2, help="DeepSpeed ZeRO stage (--ds-config)")
    parser.add_argument("--offload", action="store_true", help="DeepSpeed: offload the optimizer (and stage-3 weights)")
    parser.add_argument("--config", default=None, help="the recipe whose settings --ds-config uses (e.g. sft-smollm2-countdown)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..io import write_json_atomic
    from .zero import ZeroConfig, deepspeed_config, format_table, measure, summary

    if args.ds_config:
        from .sft import load_sft_config

        config = load_sft_config(args.config) if args.config else load_sft_config()
        write_json_atomic(args.ds_config, deepspeed_config(config, args.stage, args.world_size, args.offload))
        print(f"wrote {args.ds_config} (ZeRO-{args.stage}); launch with: deepspeed --num_gpus N train.py "
              f"--deepspeed_config {args.ds_config}  (or accelerate launch --use_deepspeed)")
        return 0
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    config = ZeroConfig(model=args.model, world_size=args.world_size, strategies=strategies, steps=args.steps,
                        batch_size=args.batch_size, seq_len=args.seq_len).validate()
    if args.json:
        from ..io import ensure_writable_dir
        from pathlib import Path

        ensure_writable_dir(Path(args.json).resolve().parent, option="--json")
    print(f"zero: {args.model} on {config.world_size} gloo processes, {config.steps} AdamW steps of "
          f"{config.batch_size} x {config.seq_len} tokens per rank; {platform.processor() or platform.machine()}",
          file=sys.stderr)
    try:
        results = measure(config)
    except RuntimeError as error:
        raise UserError(f"a process failed ({str(error).splitlines()[0]}); see the output above") from None
    n_params = results[0][0]["n_params"]
    print(f"Psi = {n_params:,} parameters; MiB per rank (largest rank), P = parameters, G = gradients, "
          f"O = Adam moments")
    print(format_table(results, config.world_size))
    if args.json:
        write_json_atomic(args.json, summary(results, config))
    return 0
