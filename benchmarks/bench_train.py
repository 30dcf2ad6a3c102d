"""Training throughput: lmforge's Trainer vs a transformers training step, same shapes, same run.

One optimizer step = forward + loss + backward + global-norm clipping + AdamW. lmforge runs its
real `Trainer.train_step` (its from-scratch AdamW, parameter groups, schedule); transformers runs
GPT2LMHeadModel with torch.optim.AdamW. fp32 and bf16 autocast; tokens/s and MFU against this
machine's matmul peak measured in the same run. Ends with one JSON line.

    python benchmarks/bench_train.py [--steps 3] [--batch-size 8] [--seq-len 256]
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch
import torch.nn.functional as F
from bench_model import add_shape_arguments, autocast, hf_model, median_seconds, model_configs, peaks

from lmforge.model import GPT
from lmforge.model.info import flops_per_token
from lmforge.train import CausalLMObjective, Trainer, TrainConfig


class RepeatBatch:
    """The same batch every step: throughput only (the Trainer's BatchSource protocol)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def lmforge_step(config, ids: torch.Tensor, precision: str, run_dir: str, optimizer: str, compile: bool = False,
                 fused_loss: bool = True):
    train_config = TrainConfig(max_steps=10_000, precision=precision, optimizer=optimizer, lr=1e-4,
                               warmup_steps=0, progress=False, peak_flops=1.0, compile=compile)
    trainer = Trainer(GPT(config), CausalLMObjective(fused_loss=fused_loss), RepeatBatch(ids), train_config,
                      run_dir=run_dir)
    return lambda: trainer.train_step()


def hf_step(family: str, config, ids: torch.Tensor, precision: str, compile: bool = False):
    model = hf_model(family, config).train()
    model = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        with autocast(precision):
            logits = model(inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()
    peak = peaks()
    bf16_emulated = peak["bf16"] < peak["fp32"]
    config = model_configs(args)["gpt2"]
    flops = flops_per_token(config, args.seq_len)
    rows, figures = [], {"batch_size": args.batch_size, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
                         "parameters": sum(p.numel() for p in GPT(config).parameters()),
                         "peak_gflops_fp32": round(peak["fp32"] / 1e9, 1),
                         "peak_gflops_bf16": round(peak["bf16"] / 1e9, 1), "bf16_emulated": bf16_emulated}
    with tempfile.TemporaryDirectory() as run_dir:
        for precision in ("fp32", "bf16"):
            batch = 1 if precision == "bf16" and bf16_emulated else args.batch_size
            steps = 2 if precision == "bf16" and bf16_emulated else args.steps
            torch.manual_seed(0)
            ids = torch.randint(0, args.vocab_size, (batch, args.seq_len + 1))
            steps_by_name = {
                "lmforge (AdamW from scratch)": lmforge_step(config, ids, precision, run_dir, "adamw"),
                "lmforge (torch fused AdamW)": lmforge_step(config, ids, precision, run_dir, "fused"),
                "lmforge (fused AdamW, unfused loss)": lmforge_step(config, ids, precision, run_dir, "fused",
                                                                    fused_loss=False),
                "transformers + torch AdamW": hf_step("gpt2", config, ids, precision),
            }
            if not args.no_compile:
                steps_by_name["lmforge compiled (fused AdamW)"] = lmforge_step(config, ids, precision, run_dir, "fused",
                                                                              compile=True)
                steps_by_name["transformers + torch.compile"] = hf_step("gpt2", config, ids, precision, compile=True)
            tokens = batch * args.seq_len
            tokens_per_s = {name: tokens / median_seconds(step, steps) for name, step in steps_by_name.items()}
            reference = tokens_per_s["transformers + torch AdamW"]
            best = max(value for name, value in tokens_per_s.items() if name.startswith("lmforge"))
            for name, value in tokens_per_s.items():
                rows.append((precision, batch, name, value, value / reference, value * flops / peak[precision]))
            figures[f"{precision}_tokens_per_s"] = {name: round(value, 1) for name, value in tokens_per_s.items()}
            figures[f"{precision}_ratio_best"] = round(best / reference, 3)
            if "transformers + torch.compile" in tokens_per_s:
                figures[f"{precision}_ratio_best_vs_compiled"] = round(best / tokens_per_s["transformers + torch.compile"], 3)
            figures[f"{precision}_mfu_best"] = round(best * flops / peak[precision], 4)

    print(f"training step (GPT-2 shapes d={args.d_model} L={args.n_layers} H={args.n_heads} V={args.vocab_size}, "
          f"{figures['parameters'] / 1e6:.1f}M params, T={args.seq_len}), {torch.get_num_threads()} threads; "
          f"matmul peak fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s"
          + (" (bf16 emulated on this CPU: bf16 rows use batch 1)" if bf16_emulated else ""))
    print(f"{'dtype':<6}{'B':>3}  {'implementation':<36}{'tokens/s':>10}{'vs HF':>8}{'MFU':>8}")
    for precision, batch, name, value, ratio, mfu in rows:
        print(f"{precision:<6}{batch:>3}  {name:<36}{value:>10.1f}{ratio:>7.2f}x{mfu:>8.1%}")
    print(json.dumps({"benchmark": "train_throughput", **figures}))


if __name__ == "__main__":
    main()
