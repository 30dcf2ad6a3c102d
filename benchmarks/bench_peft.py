"""PEFT methods on SmolLM2-135M-Instruct, CPU: full fine-tuning, LoRA, QLoRA, prompt tuning, and
LoRA in peft + transformers on the same model and batches; NF4 dequantization vs bitsandbytes.

Every method trains on the same SFT batches (reasoning-gym countdown, the demo's data; loss on
the assistant replies; rows padded to the longest, no packing since prompt tuning prepends to
whole rows) for --steps steps at the same batch size, AdamW, clipping 1.0, fp32, each in its own
subprocess so that its peak RSS is its own. Reported per method:

  trainable   parameters with requires_grad
  peak RSS    the process's maximum resident set (ru_maxrss) after the last step, model loading
              included (QLoRA reads its base layer by layer straight into NF4, as `lmforge sft
              peft=qlora` does)
  tokens/s    real (non-padding) input tokens per second over the steps after the first two
  val loss    the held-out conversations' loss after the steps (lmforge's evaluation, the same
              for every method), with the base model's for reference

  full        lmforge Trainer, every weight (lr 1e-4)
  lora        lmforge LoRA r=16 alpha=32 on every linear layer (lr 2e-4)
  qlora       the same adapters on an NF4 base (double-quantized absmax, blocks of 64), with
              activation checkpointing, as in the QLoRA paper (the others store activations)
  --trim-host-memory N: every lmforge method returns freed heap pages to the OS after every N-th
              block (TrainConfig.trim_host_memory; glibc's malloc_trim), so peak RSS follows the
              live tensors rather than glibc's retained heap
  prompt      prompt tuning, 20 virtual tokens initialised from the text of a task hint (lr 3e-2)
  peft        peft.get_peft_model(transformers' LlamaForCausalLM, LoraConfig(r=16, alpha=32,
              all-linear)) trained by a plain loop on the identical batches (labels shifted the
              way transformers does); this is the LoRA tokens/s reference (target lmforge >= 1.2x)

NF4 dequantization: a [4096, 4096] weight quantized by both (the bytes are identical, see
tests/test_quant_nf4.py), dequantized --dequant-reps times; weights/s of lmforge.peft.qlora's
dequantize_fast vs bitsandbytes.functional.dequantize_4bit (target: within 2x).

    python benchmarks/bench_peft.py [--steps 10] [--batch-size 4] [--seq-len 256] [--threads 2]
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import StepClock, machine, peak_rss_gb  # noqa: E402  (the house helpers)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
MODEL = "smollm2-135m-instruct"
DATA = ("reasoning-gym:countdown?size={examples}&seed=0&min_numbers=2&max_numbers=2&min_target=10&max_target=60"
        "&min_value=2&max_value=30")
WARMUP_STEPS = 2
METHODS = ("qlora", "lora", "prompt", "peft", "full")     # full FT last: the most memory
LR = {"full": 1e-4, "lora": 2e-4, "qlora": 2e-4, "prompt": 3e-2, "peft": 2e-4}
PROMPT_TEXT = "Combine the given numbers with + - * / into an expression that equals the target."


def sft_config(args: argparse.Namespace, method: str, out_dir: str):
    from lmforge.train.sft import load_sft_config

    peft = {"full": "none", "peft": "none"}.get(method, method)
    return load_sft_config(None, [
        f"model={MODEL}", f"data={DATA.format(examples=args.examples)}", f"val_examples={args.val_examples}",
        f"seq_len={args.seq_len}", f"batch_size={args.batch_size}", "packing=false", "train_on=assistant",
        f"max_steps={args.steps}", f"lr={LR[method]}", f"min_lr={LR[method]}", "schedule=constant",
        "warmup_steps=0", "weight_decay=0", "grad_clip=1.0", "precision=fp32", "device=cpu", "progress=false",
        "eval_at_start=false", "eval_prompts=0", "checkpoint_interval=0", "log_interval=1", "seed=0",
        f"out_dir={out_dir}", f"name={method}", f"peft={peft}", "lora.r=16", "lora.alpha=32",
        "lora.target_modules=all-linear", "prompt.num_virtual_tokens=20", "prompt.init=text",
        f"prompt.init_text={PROMPT_TEXT}", f"activation_checkpointing={method == 'qlora'}",
        f"trim_host_memory={args.trim_host_memory}"])


def run_method(args: argparse.Namespace, method: str, work: Path) -> dict:
    """One method in this (child) process: load, adapt, train --steps steps, evaluate."""
    import torch

    torch.set_num_threads(args.threads)
    from lmforge.eval import evaluate_objective
    from lmforge.train import Trainer
    from lmforge.train.objectives import SFTObjective
    from lmforge.train.sft import _with_adapters, load_causal_lm, qlora_settings
    from lmforge.train.sft_data import prepare_sft_data

    config = sft_config(args, method, str(work / "runs"))
    config.model = str(work / "hf_base")  # the same weights as the bundled GGUF, read much faster
    if method == "peft":                  # the tokenizer only: our model would count in peft's RSS
        from lmforge.tokenizer import load_tokenizer

        return run_peft(args, work, prepare_sft_data(config, load_tokenizer(work / "hf_base")))
    model, tokenizer = load_causal_lm(config.model, None, config.seed, qlora=qlora_settings(config))
    data = prepare_sft_data(config, tokenizer)
    model, options = _with_adapters(model.float(), config, tokenizer)
    options = {key: value for key, value in options.items() if key == "export_state"}
    extra = {}
    if method == "qlora":
        from lmforge.peft.qlora import bits_per_parameter

        extra["bits_per_parameter"] = bits_per_parameter(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counted, clock = Counted(data.train), Clock()
    trainer = Trainer(model, SFTObjective(), counted, config, run_dir=config.run_dir, hooks=[clock])
    clock.begin()
    trainer.fit()
    figures = clock.figures(counted.tokens, args.threads)
    with torch.no_grad():
        metrics = evaluate_objective(trainer.raw.eval(), SFTObjective(), data.val.iter_fixed())
    return {**figures, **extra, "trainable": trainable, "val_loss": metrics["val_loss"],
            "val_accuracy": metrics.get("val_accuracy"), "train_loss": [round(r["loss"], 4) for r in clock.rows]}


class Counted:
    """A batch source that counts each batch's real tokens (and can replay the batches)."""

    def __init__(self, inner) -> None:
        self.inner, self.tokens, self.batches = inner, [], []

    def next_batch(self):
        batch = self.inner.next_batch()
        self.tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch
                           else batch["input_ids"].numel())
        return batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


class Clock(StepClock):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    def on_step_end(self, trainer, step, row) -> None:
        self.step_end()
        self.rows.append(row)


def run_peft(args: argparse.Namespace, work: Path, data) -> dict:
    """peft + transformers LoRA on the same batches: a plain loop (forward, backward, clip, AdamW)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "hf_base", dtype=torch.float32, attn_implementation="sdpa")
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR["peft"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    clock, tokens, losses = StepClock(), [], []
    clock.begin()
    for _ in range(args.steps):
        batch = data.train.next_batch()
        # Our labels are already next-token labels at each input position; transformers shifts
        # them itself, so give it the input ids with the same positions labelled.
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, 1:] = batch["labels"][:, :-1]
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
        losses.append(round(float(out.loss), 4))
        clock.step_end()
    figures = clock.figures(tokens, args.threads)
    return {**figures, "trainable": sum(p.numel() for p in trainable), "val_loss": None, "val_accuracy": None,
            "train_loss": losses, "peft_version": peft.__version__}


def run_base_eval(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lmforge.eval import evaluate_objective
    from lmforge.model.loading import export, load
    from lmforge.train.objectives import SFTObjective
    from lmforge.train.sft_data import prepare_sft_data

    if (work / "hf_base" / "model.safetensors").is_file():   # --keep DIR: exported by an earlier run
        model, tokenizer = load(str(work / "hf_base"))
    else:
        model, tokenizer = load(MODEL)
        export(model, tokenizer, work / "hf_base", "hf")      # for the peft side (nothing is downloaded)
    data = prepare_sft_data(sft_config(args, "full", str(work / "runs")), tokenizer)
    with torch.no_grad():
        metrics = evaluate_objective(model.float().eval(), SFTObjective(), data.val.iter_fixed())
    return {"val_loss": metrics["val_loss"], "val_accuracy": metrics.get("val_accuracy"), "peak_rss_gb": peak_rss_gb()}


def run_dequant(args: argparse.Namespace, work: Path) -> dict:
    """Weights/s of NF4 dequantization: ours vs bitsandbytes' CPU kernel, the same quantized weight."""
    import bitsandbytes.functional as bnbF
    import torch

    from lmforge.peft.qlora import dequantize_fast
    from lmforge.quant.nf4 import quantize_nf4

    torch.set_num_threads(args.threads)
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    ours_q = quantize_nf4(weight)
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    equal = bool(torch.equal(dequantize_fast(ours_q), bnbF.dequantize_4bit(packed, state)))

    def rate(fn) -> float:
        fn()
        times = []
        for _ in range(args.dequant_reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return weight.numel() / sorted(times)[len(times) // 2]

    ours = rate(lambda: dequantize_fast(ours_q))
    theirs = rate(lambda: bnbF.dequantize_4bit(packed, state))
    return {"ours_weights_per_s": ours, "bnb_weights_per_s": theirs, "equal": equal,
            "bits_per_parameter": ours_q.bits_per_parameter()}


def child(role: str, args: argparse.Namespace, work: Path) -> dict:
    out, log = work / f"{role}.json", work / f"{role}.log"
    if args.keep and out.is_file():      # --keep DIR: a role that finished there is not run again
        print(f"  {role}: reused {out}", file=sys.stderr)
        return json.loads(out.read_text())
    flags = ["--steps", args.steps, "--seq-len", args.seq_len, "--batch-size", args.batch_size, "--examples",
             args.examples, "--val-examples", args.val_examples, "--threads", args.threads,
             "--dequant-reps", args.dequant_reps, "--trim-host-memory", args.trim_host_memory]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    with open(log, "w") as stream:
        code = subprocess.call([sys.executable, __file__, "--role", role, "--work", str(work), *map(str, flags)],
                               stdout=stream, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not out.is_file():
        raise SystemExit(f"bench_peft.py: the {role} run failed (exit {code}):\n{log.read_text(errors='replace')[-3000:]}")
    print(f"  {role}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per method (the first 2 untimed)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--examples", type=int, default=400, help="countdown conversations generated")
    parser.add_argument("--val-examples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--dequant-reps", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS), help="a subset of " + ",".join(METHODS))
    parser.add_argument("--trim-host-memory", type=int, default=0, metavar="N",
                        help="lmforge's methods: malloc_trim after every N-th block (TrainConfig.trim_host_memory)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (a rerun reuses finished methods)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS}")
    if args.role:
        work = Path(args.work)
        role = {"base": run_base_eval, "dequant": run_dequant}.get(args.role)
        result = role(args, work) if role else run_method(args, args.role, work)
        (work / f"{args.role}.json").write_text(json.dumps(result))
        return

    host = machine()
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="bench_peft_") as directory:
        work = Path(args.keep or directory)
        work.mkdir(parents=True, exist_ok=True)
        base = child("base", args, work)
        dequant = child("dequant", args, work)
        runs = {method: child(method, args, work) for method in methods}

    print(f"PEFT on {MODEL}: {DATA.format(examples=args.examples)}, {args.batch_size} rows/step of <= {args.seq_len} "
          f"tokens (padded, no packing), {args.steps} steps (first {WARMUP_STEPS} untimed), fp32, AdamW")
    print(f"machine: {host['cpu']}, native bf16 {'yes' if host['native_bf16'] else 'no'}, {args.threads} threads "
          f"(of {host['cores']} cores), torch {host['torch']}")
    print(f"{'method':<8}{'trainable':>13}{'peak RSS GB':>13}{'tokens/s':>10}{'val loss':>10}{'lr':>8}{'CPU use':>9}")
    print(f"{'base':<8}{'':>13}{base['peak_rss_gb']:>13.2f}{'':>10}{base['val_loss']:>10.4f}")
    for method, run in runs.items():
        val = f"{run['val_loss']:>10.4f}" if run["val_loss"] is not None else f"{'-':>10}"
        print(f"{method:<8}{run['trainable']:>13,}{run['peak_rss_gb']:>13.2f}{run['tokens_per_s']:>10.1f}{val}"
              f"{LR[method]:>8g}{run['cpu_utilization']:>9.0%}")
    print(f"NF4 dequantization of a 4096x4096 weight: lmforge {dequant['ours_weights_per_s'] / 1e6:.0f} M weights/s, "
          f"bitsandbytes {dequant['bnb_weights_per_s'] / 1e6:.0f} M weights/s (equal output: {dequant['equal']}); "
          f"{dequant['bits_per_parameter']:.3f} bits per parameter")
    disturbed = [m for m, run in runs.items() if run["cpu_utilization"] < 0.8]
    if disturbed:
        print(f"WARNING: {', '.join(disturbed)} got under 80% of its threads' CPU time (other processes were "
              "running); rerun on a quiet machine for clean tokens/s")
    figures = {"bench": "peft", "model": MODEL, "steps": args.steps, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "threads": args.threads, "cpu": host["cpu"], "native_bf16": host["native_bf16"],
               "torch": host["torch"], "val_loss_base": round(base["val_loss"], 4), "disturbed": bool(disturbed),
               "trim_host_memory": args.trim_host_memory}
    for method, run in runs.items():
        figures[f"trainable_{method}"] = run["trainable"]
        figures[f"peak_rss_gb_{method}"] = round(run["peak_rss_gb"], 3)
        figures[f"tokens_per_s_{method}"] = round(run["tokens_per_s"], 1)
        figures[f"cpu_utilization_{method}"] = round(run["cpu_utilization"], 3)
        if run["val_loss"] is not None:
            figures[f"val_loss_{method}"] = round(run["val_loss"], 4)
    if "qlora" in runs and "full" in runs:
        figures["qlora_over_full_peak_rss"] = round(runs["qlora"]["peak_rss_gb"] / runs["full"]["peak_rss_gb"], 3)
    if "lora" in runs and "peft" in runs:
        figures["lora_over_peft_tokens_per_s"] = round(runs["lora"]["tokens_per_s"] / runs["peft"]["tokens_per_s"], 3)
    if "qlora" in runs:
        figures["qlora_bits_per_parameter"] = round(runs["qlora"]["bits_per_parameter"], 4)
    figures["nf4_dequant_ours_over_bnb"] = round(dequant["ours_weights_per_s"] / dequant["bnb_weights_per_s"], 3)
    figures["nf4_dequant_equal"] = dequant["equal"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
