"""Forward+backward throughput of lmforge's GPT vs transformers at identical shapes (CPU).

Compares against GPT2LMHeadModel (GPT-2 recipe) and LlamaForCausalLM (Llama recipe), in fp32 and
in bf16 autocast, and reports tokens/s, the ratio, and MFU against this machine's matmul peak for
the dtype (measured here, in the same run). lmforge is timed eager and with torch.compile, with
logits + cross-entropy as transformers does and with its fused output layer + loss (what its
Trainer runs); transformers eager and compiled. Ends with one JSON line.

On CPUs without native bf16 (no AVX512-BF16/AMX), bf16 matmuls are emulated and run tens of times
slower than fp32; the bf16 rows then use batch size 1 so the benchmark finishes (it says so).

    python benchmarks/bench_model.py [--steps 3] [--batch-size 8] [--seq-len 256] [--no-compile]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

from lmforge.model import GPT, ModelConfig, get_preset
from lmforge.model.info import flops_per_token
from lmforge.train.throughput import measure_matmul_flops



def model_configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    shapes = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
                  max_seq_len=args.seq_len)
    return {"gpt2": get_preset("gpt2-tiny", **shapes),
            "llama": get_preset("tiny", **shapes, n_kv_heads=max(1, args.n_heads // 3))}


def hf_model(family: str, config: ModelConfig) -> torch.nn.Module:
    """transformers' model with the same shapes as `config` (dropout off, SDPA attention)."""
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(
            n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads, vocab_size=config.vocab_size,
            n_positions=config.max_seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            attn_implementation="sdpa"))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, vocab_size=config.vocab_size,
        max_position_embeddings=config.max_seq_len, tie_word_embeddings=True, attn_implementation="sdpa"))


def autocast(dtype_name: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype_name == "bf16" else contextlib.nullcontext()


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    output = model(ids)
    return output.logits if hasattr(output, "logits") else output


def median_seconds(step, steps: int) -> float:
    """Median of `steps` timed calls after one warm-up call (which also triggers compilation)."""
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def forward_backward(model: torch.nn.Module, ids: torch.Tensor, dtype_name: str):
    def step() -> None:
        with autocast(dtype_name):
            logits = logits_of(model, ids)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        for parameter in model.parameters():
            parameter.grad = None
    return step


def fused_forward_backward(model: torch.nn.Module, ids: torch.Tensor, dtype_name: str):
    """lmforge's training path: the output layer and the loss fused (GPT.forward(labels=...)),
    so the [B, T, V] logits are never built (model/lm_head_loss.py)."""
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    count = labels[:, :-1].numel()

    def step() -> None:
        with autocast(dtype_name):
            loss = model(ids, labels=labels, return_output=True).loss_sum / count
        loss.backward()
        for parameter in model.parameters():
            parameter.grad = None
    return step


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batch shape flags that this benchmark and bench_train.py share."""
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--n-heads", type=int, default=6)
    parser.add_argument("--vocab-size", type=int, default=8192)


def peaks() -> dict[str, float]:
    cpu = torch.device("cpu")
    return {name: measure_matmul_flops(cpu, name, seconds=1.0) for name in ("fp32", "bf16")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()
    peak = peaks()
    bf16_emulated = peak["bf16"] < peak["fp32"]   # native bf16 (AMX, AVX512-BF16) is faster than fp32
    rows, figures = [], {"batch_size": args.batch_size, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
                         "peak_gflops_fp32": round(peak["fp32"] / 1e9, 1),
                         "peak_gflops_bf16": round(peak["bf16"] / 1e9, 1), "bf16_emulated": bf16_emulated}
    for family, config in model_configs(args).items():
        flops = flops_per_token(config, args.seq_len)
        for dtype_name in ("fp32", "bf16"):
            batch = 1 if dtype_name == "bf16" and bf16_emulated else args.batch_size
            steps = 2 if dtype_name == "bf16" and bf16_emulated else args.steps
            torch.manual_seed(0)
            ids = torch.randint(0, args.vocab_size, (batch, args.seq_len))
            ours, theirs = GPT(config).train(), hf_model(family, config).train()
            measured = {"lmforge": forward_backward(ours, ids, dtype_name),
                        "lmforge fused loss": fused_forward_backward(ours, ids, dtype_name),
                        "transformers": forward_backward(theirs, ids, dtype_name)}
            if not args.no_compile:
                # Both sides compiled: a user who compiles transformers is the fair reference too.
                compiled = torch.compile(ours)
                measured["lmforge compiled"] = forward_backward(compiled, ids, dtype_name)
                measured["lmforge fused compiled"] = fused_forward_backward(compiled, ids, dtype_name)
                measured["transformers compiled"] = forward_backward(torch.compile(theirs), ids, dtype_name)
            tokens_per_s = {name: ids.numel() / median_seconds(step, steps) for name, step in measured.items()}
            best_ours = max(value for name, value in tokens_per_s.items() if name.startswith("lmforge"))
            # "vs HF" is against transformers eager; the JSON also has the ratio against compiled.
            key = f"{family}_{dtype_name}"
            for name, value in tokens_per_s.items():
                rows.append((family, dtype_name, batch, name, value, value / tokens_per_s["transformers"],
                             value * flops / peak[dtype_name]))
            figures[f"{key}_tokens_per_s"] = {name: round(value, 1) for name, value in tokens_per_s.items()}
            figures[f"{key}_ratio_eager"] = round(tokens_per_s["lmforge"] / tokens_per_s["transformers"], 3)
            figures[f"{key}_ratio_best"] = round(best_ours / tokens_per_s["transformers"], 3)
            if "transformers compiled" in tokens_per_s:
                figures[f"{key}_ratio_best_vs_compiled"] = round(best_ours / tokens_per_s["transformers compiled"], 3)
            figures[f"{key}_mfu_best"] = round(best_ours * flops / peak[dtype_name], 4)

    print(f"forward+backward, T={args.seq_len}, d={args.d_model} L={args.n_layers} H={args.n_heads} "
          f"V={args.vocab_size}, {torch.get_num_threads()} threads; measured matmul peak "
          f"fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s"
          + (" (bf16 emulated on this CPU: bf16 rows use batch 1)" if bf16_emulated else ""))
    print(f"{'family':<7}{'dtype':<6}{'B':>3}  {'implementation':<23}{'tokens/s':>10}{'vs HF':>8}{'MFU':>8}")
    for family, dtype_name, batch, name, value, ratio, mfu in rows:
        print(f"{family:<7}{dtype_name:<6}{batch:>3}  {name:<23}{value:>10.1f}{ratio:>7.2f}x{mfu:>8.1%}")
    print(json.dumps({"benchmark": "model_forward_backward", **figures}))


if __name__ == "__main__":
    main()
