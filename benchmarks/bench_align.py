"""Alignment throughput: `lmforge align dpo` vs TRL's DPOTrainer, same model, pairs, batch and run.

DPO: both train SmolLM2-135M-Instruct (lmforge: the bundled GGUF dequantized to fp32; TRL: the
same weights exported to an HF directory) with the sigmoid loss (beta 0.1) against a frozen copy
of the starting model, on the same pairs: reasoning-gym chain_sum questions, chosen = the task's
answer, rejected = a wrong number, in conversational prompt/chosen/rejected form. --batch-size
pairs per step, constant lr, AdamW (betas 0.9/0.95, eps 1e-8, no weight decay), clipping 1.0,
fp32, the same torch threads, each side in its own subprocess.

  lmforge  PairBatches (chosen and rejected rows in one batch) and Trainer.fit with
           PreferenceObjective: one forward over both sides, the output layer only at response
           positions, the reference's log-probs computed once per pair in `prepare`
  trl      DPOTrainer with ref_model = a copy (reference forward every step, as TRL does unless
           precompute_ref_log_probs), padding to the batch's longest row

tokens/s counts the real (non-padding) tokens of chosen + rejected rows on both sides, over the
steps after the first two. Target: lmforge >= 1.3x TRL.

GRPO (benchmarks/bench_grpo.py, run here with its defaults): time per step (generation + update)
vs TRL's GRPOTrainer at the same G, prompts and completion lengths, and the share spent generating.
Ends with one JSON line.

    python benchmarks/bench_align.py [--steps 8] [--batch-size 4] [--pairs 64] [--skip-grpo]
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
from bench_sft import WARMUP_STEPS, StepClock, export_base, machine, peak_rss_gb  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
MODEL = "smollm2-135m-instruct"
SEED = 0
BETA = 0.1


def make_pairs(path: Path, n: int) -> None:
    """chain_sum questions: chosen the right sum, rejected the sum plus one (TRL conversational form)."""
    from lmforge.data.chat_corpora import reasoning_gym_conversations

    with open(path, "w", encoding="utf-8") as handle:
        for conversation in reasoning_gym_conversations("chain_sum", n, SEED):
            answer = conversation.messages[-1]["content"]
            wrong = str(int(answer) + 1) if answer.lstrip("-").isdigit() else answer + "0"
            handle.write(json.dumps({"prompt": conversation.messages[:-1],
                                     "chosen": [{"role": "assistant", "content": answer}],
                                     "rejected": [{"role": "assistant", "content": wrong}]}) + "\n")


def run_lmforge(args: argparse.Namespace, work: Path) -> dict:
    import copy

    import torch

    torch.set_num_threads(args.threads)
    from lmforge.align.data import PairBatches, pad_id_of, read_pairs, tokenize_pairs
    from lmforge.align.preference import PreferenceObjective
    from lmforge.model.loading import load
    from lmforge.train import Trainer, TrainConfig

    started = time.perf_counter()
    model, tokenizer = load(MODEL)
    pairs, _ = tokenize_pairs(read_pairs(work / "pairs.jsonl"), tokenizer, 1024)
    batches = PairBatches(pairs, args.batch_size, pad_id=pad_id_of(tokenizer), seed=SEED)
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr,
                         schedule="constant", warmup_steps=0, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8,
                         grad_clip=1.0, precision="fp32", device="cpu", progress=False, eval_interval=0,
                         checkpoint_interval=0, log_interval=1, seed=SEED)
    tokens: list[int] = []

    class Clock(StepClock):
        def on_train_start(self, trainer) -> None:
            self.begin()

        def on_step_end(self, trainer, step, row) -> None:
            self.step_end()

    class Counted:
        def __init__(self, inner) -> None:
            self.inner = inner

        def next_batch(self):
            batch = self.inner.next_batch()
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

        def state_dict(self):
            return self.inner.state_dict()

        def load_state_dict(self, state):
            self.inner.load_state_dict(state)

    clock = Clock()
    trainer = Trainer(model.float(), PreferenceObjective("sigmoid", beta=BETA), Counted(batches), config,
                      run_dir=work / "runs" / "lmforge", hooks=[clock],
                      frozen_models={"reference": copy.deepcopy(model).float()})
    result = trainer.fit()
    figures = clock.figures(tokens, args.threads)
    return {**figures, "seconds": time.perf_counter() - started,
            "train_loss": [round(row["loss"], 4) for row in result.history if "loss" in row]}


def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    hf_dir = work / "hf_base"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    records = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    dpo_args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                         learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, beta=BETA,
                         loss_type=["sigmoid"], logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         bf16=False, fp16=False, seed=SEED, dataloader_num_workers=0, max_length=1024)
    trainer = DPOTrainer(model=model, ref_model=reference, args=dpo_args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer)
    tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator

    class Clock(StepClock, TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.begin()

        def on_step_end(self, *_, **__):
            self.step_end()

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    return {**clock.figures(tokens, args.threads), "seconds": time.perf_counter() - started,
            "trl_version": trl.__version__, "peak_rss_gb_end": peak_rss_gb()}


def bench_grpo(args: argparse.Namespace, work: Path) -> dict | None:
    """GRPO vs TRL's GRPOTrainer (bench_grpo.py, its default sizes), in the same run."""
    if args.skip_grpo:
        return None
    import bench_grpo

    parser = argparse.ArgumentParser()
    bench_grpo.add_arguments(parser)
    return bench_grpo.bench(parser.parse_args(["--threads", str(args.threads)]), work)


def child(role: str, args: argparse.Namespace, work: Path) -> dict:
    out, log = work / f"{role}.json", work / f"{role}.log"
    flags = ["--steps", args.steps, "--batch-size", args.batch_size, "--pairs", args.pairs, "--lr", args.lr,
             "--threads", args.threads]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    with open(log, "w") as stream:
        code = subprocess.call([sys.executable, __file__, "--role", role, "--work", str(work), *map(str, flags)],
                               stdout=stream, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not out.is_file():
        raise SystemExit(f"bench_align.py: the {role} run failed (exit {code}):\n{log.read_text(errors='replace')[-3000:]}")
    print(f"  {role}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--keep", metavar="DIR")
    parser.add_argument("--skip-grpo", action="store_true", help="DPO only (GRPO: benchmarks/bench_grpo.py)")
    parser.add_argument("--role", choices=["lmforge", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS}")
    if args.role:
        work = Path(args.work)
        result = {"lmforge": run_lmforge, "trl": run_trl}[args.role](args, work)
        (work / f"{args.role}.json").write_text(json.dumps(result))
        return
    host = machine()
    with tempfile.TemporaryDirectory(prefix="bench_align_") as directory:
        work = Path(args.keep or directory)
        work.mkdir(parents=True, exist_ok=True)
        export_base(work)
        make_pairs(work / "pairs.jsonl", args.pairs)
        sides = {"lmforge": child("lmforge", args, work), "trl": child("trl", args, work)}
        grpo = bench_grpo(args, work)
    ours, theirs = sides["lmforge"], sides["trl"]
    print(f"DPO (sigmoid, beta {BETA}) {MODEL}, {args.pairs} chain_sum pairs, {args.batch_size} pairs/step, {args.steps} "
          f"steps (first {WARMUP_STEPS} untimed), fp32; machine: {host['cpu']}, {args.threads} threads, torch "
          f"{host['torch']}, trl {theirs['trl_version']}")
    print(f"{'':<9}{'tokens/s':>10}{'peak RSS GB':>13}{'step s':>8}{'CPU use':>9}")
    for name, side in sides.items():
        print(f"{name:<9}{side['tokens_per_s']:>10.1f}{side['peak_rss_gb']:>13.2f}{side['median_step_s']:>8.2f}"
              f"{side['cpu_utilization']:>9.0%}")
    print(f"real tokens per step: lmforge {ours['step_tokens']}, trl {theirs['step_tokens']}")
    disturbed = any(side["cpu_utilization"] < 0.8 for side in sides.values())
    if disturbed:
        print("WARNING: a side got under 80% of its threads' CPU time (a shared machine); rerun on a quiet one")
    figures = {"bench": "align", "model": MODEL, "pairs": args.pairs, "steps": args.steps, "batch_size": args.batch_size,
               "threads": args.threads, "cpu": host["cpu"], "torch": host["torch"], "trl": theirs["trl_version"],
               "dpo_tokens_per_s_lmforge": round(ours["tokens_per_s"], 1),
               "dpo_tokens_per_s_trl": round(theirs["tokens_per_s"], 1),
               "dpo_tokens_per_s_ratio_lmforge_over_trl": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
               "dpo_peak_rss_gb_lmforge": round(ours["peak_rss_gb"], 3), "dpo_peak_rss_gb_trl": round(theirs["peak_rss_gb"], 3),
               "same_step_tokens": ours["step_tokens"] == theirs["step_tokens"], "disturbed": disturbed,
               "grpo": grpo}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
