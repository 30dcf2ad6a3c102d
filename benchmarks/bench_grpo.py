"""GRPO step time: lmforge's GRPOObjective in the one Trainer vs TRL's GRPOTrainer, same run.

Both sides train SmolLM2-135M-Instruct (lmforge: the bundled GGUF dequantized to fp32; TRL: the
same weights exported to an HF directory) on the same reasoning-gym chain_sum prompts (chat
template), with the same G completions per prompt, --batch-size completions per step, exactly
--completion-tokens new tokens per completion (lmforge: ignore_eos; TRL: min_new_tokens), the
same exact-match reward, beta 0 (TRL's default: no reference model), loss dapo, one update per
generation, constant lr, AdamW, fp32, the same torch threads, each side in its own subprocess.

  lmforge  prompts through PromptBatches; rollouts in `prepare` through lmforge's engine (one
           batch of G x prompts, continuous batching, a prompt's KV prefix prefilled once and
           copied to its G rows; --compile: the compiled static decode step)
  trl      GRPOTrainer, rollouts with transformers' `generate` (TRL's default on CPU)

Reported: median seconds per step (generation + update) over the steps after the first
WARMUP_STEPS, and lmforge's share of step time spent generating. Target (issue 12): lmforge
>= 2x faster per step. Ends with one JSON line.

    python benchmarks/bench_grpo.py [--steps 6] [--generations 8] [--batch-size 16] [--completion-tokens 32] [--compile]
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
from bench_sft import WARMUP_STEPS, StepClock, export_base, machine  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
MODEL = "smollm2-135m-instruct"
SEED = 0


def write_prompts(path: Path, n: int) -> None:
    from lmforge.data.chat_corpora import reasoning_gym_conversations

    with open(path, "w", encoding="utf-8") as handle:
        for conversation in reasoning_gym_conversations("chain_sum", n, SEED):
            handle.write(json.dumps({"prompt": conversation.messages[:-1],
                                     "answer": conversation.messages[-1]["content"]}) + "\n")


def exact_match(completion: str, answer: str) -> float:
    return float(completion.strip() == answer.strip())


def run_lmforge(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lmforge.align.grpo import GRPOObjective
    from lmforge.align.rewards import RewardFunctions, load_prompts
    from lmforge.align.rollout import PromptBatches
    from lmforge.model.loading import load
    from lmforge.train import Trainer, TrainConfig

    model, tokenizer = load(MODEL)
    prompts = load_prompts(str(work / "prompts.jsonl"))
    rewards = RewardFunctions(["bench_grpo:lmforge_reward"])
    objective = GRPOObjective(tokenizer, rewards, loss_type="dapo", beta=0.0, group_size=args.generations,
                              batch_size=args.batch_size, max_new_tokens=args.completion_tokens, temperature=1.0,
                              seed=SEED, rollout_batch_size=args.batch_size, compile_rollouts=args.compile,
                              ignore_eos=True)
    batches = PromptBatches(prompts, objective.prompts_per_generation, objective.updates_per_generation, seed=SEED)
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr,
                         schedule="constant", warmup_steps=0, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
                         grad_clip=1.0, precision="fp32", device="cpu", progress=False, eval_interval=0,
                         checkpoint_interval=0, log_interval=1, seed=SEED)

    class Clock(StepClock):
        def on_train_start(self, trainer) -> None:
            self.begin()

        def on_step_end(self, trainer, step, row) -> None:
            self.step_end()

    clock = Clock()
    trainer = Trainer(model.float(), objective, batches, config, run_dir=work / "runs" / "lmforge", hooks=[clock])
    result = trainer.fit()
    generate = [row["generate_s"] for row in result.history if "generate_s" in row][WARMUP_STEPS:]
    figures = clock.figures([0] * args.steps, args.threads)
    return {**figures, "generate_s": generate, "reward": [row.get("reward") for row in result.history if "reward" in row],
            "completion_length": [row.get("completion_length") for row in result.history if "completion_length" in row]}


def lmforge_reward(prompts, completions, answers, **_) -> list[float]:
    return [exact_match(c, a) for c, a in zip(completions, answers)]


def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "hf_base")
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(work / "hf_base", dtype=torch.float32, attn_implementation="sdpa")
    records = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    lengths: list[float] = []

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [exact_match(t, a) for t, a in zip(texts, answer)]

    grpo_args = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size,
                           num_generations=args.generations, max_completion_length=args.completion_tokens,
                           generation_kwargs={"min_new_tokens": args.completion_tokens}, max_steps=args.steps,
                           learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                           adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=0.0,
                           loss_type="dapo", temperature=1.0, logging_steps=1, save_strategy="no", report_to="none",
                           use_cpu=True, bf16=False, fp16=False, seed=SEED, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=grpo_args, train_dataset=Dataset.from_list(records),
                          processing_class=tokenizer)

    class Clock(StepClock, TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.begin()

        def on_step_end(self, *_, **__):
            self.step_end()

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    return {**clock.figures([0] * args.steps, args.threads), "trl_version": trl.__version__,
            "completion_length": lengths}


def child(role: str, args: argparse.Namespace, work: Path) -> dict:
    out, log = work / f"grpo-{role}.json", work / f"grpo-{role}.log"
    flags = ["--steps", args.steps, "--generations", args.generations, "--batch-size", args.batch_size,
             "--completion-tokens", args.completion_tokens, "--prompts", args.prompts, "--lr", args.lr,
             "--threads", args.threads, *(["--compile"] if args.compile else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    with open(log, "w") as stream:
        code = subprocess.call([sys.executable, __file__, "--role", role, "--work", str(work), *map(str, flags)],
                               stdout=stream, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not out.is_file():
        raise SystemExit(f"bench_grpo.py: the {role} run failed (exit {code}):\n{log.read_text(errors='replace')[-3000:]}")
    print(f"  grpo {role}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return json.loads(out.read_text())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="completions per step (batch / G prompts)")
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--compile", action="store_true", help="lmforge: the compiled decode step")


def bench(args: argparse.Namespace, work: Path) -> dict:
    """Both sides in `work` (which must hold hf_base/); returns the figures, printing a table."""
    write_prompts(work / "prompts.jsonl", args.prompts)
    ours, theirs = child("lmforge", args, work), child("trl", args, work)
    share = sum(ours["generate_s"]) / max(sum(ours["step_seconds"][WARMUP_STEPS:]), 1e-9)
    ratio = theirs["median_step_s"] / ours["median_step_s"]
    print(f"GRPO {MODEL}: G={args.generations}, {args.batch_size} completions/step of {args.completion_tokens} tokens, "
          f"{args.steps} steps (first {WARMUP_STEPS} untimed), fp32, {args.threads} threads, trl {theirs['trl_version']}")
    print(f"{'':<9}{'s/step':>8}{'CPU use':>9}{'mean completion tokens':>24}")
    for name, side in (("lmforge", ours), ("trl", theirs)):
        lengths = [x for x in side["completion_length"] if x is not None]
        print(f"{name:<9}{side['median_step_s']:>8.2f}{side['cpu_utilization']:>9.0%}"
              f"{(sum(lengths) / len(lengths) if lengths else float('nan')):>24.1f}")
    print(f"lmforge is {ratio:.2f}x faster per step; generation is {share:.0%} of its step time")
    return {"grpo_seconds_per_step_lmforge": round(ours["median_step_s"], 3),
            "grpo_seconds_per_step_trl": round(theirs["median_step_s"], 3),
            "grpo_speedup_lmforge_over_trl": round(ratio, 3), "grpo_generation_share_lmforge": round(share, 3),
            "grpo_generations": args.generations, "grpo_batch_size": args.batch_size,
            "grpo_completion_tokens": args.completion_tokens, "grpo_compiled_decode": args.compile,
            "grpo_disturbed": any(s["cpu_utilization"] < 0.8 for s in (ours, theirs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--role", choices=["lmforge", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS}")
    if args.role:
        work = Path(args.work)
        result = {"lmforge": run_lmforge, "trl": run_trl}[args.role](args, work)
        (work / f"grpo-{args.role}.json").write_text(json.dumps(result))
        return
    host = machine()
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as directory:
        work = Path(directory)
        export_base(work)
        figures = bench(args, work)
    print(json.dumps({"bench": "grpo", "model": MODEL, "cpu": host["cpu"], "torch": host["torch"],
                      "threads": args.threads, **figures}))


if __name__ == "__main__":
    main()
