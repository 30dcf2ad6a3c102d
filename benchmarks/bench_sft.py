"""SFT throughput and quality: `lmforge sft` vs TRL's SFTTrainer, same model, data, batch and run.

Both fine-tune SmolLM2-135M-Instruct (lmforge: the bundled GGUF dequantized to fp32; TRL: the same
weights exported to an HF directory) on single-turn reasoning-gym chain_sum conversations, with
loss on the assistant reply only (its end-of-turn token included), best-fit packing into rows of
--seq-len tokens that never attend to each other, --batch-size rows per step, constant lr, AdamW
(betas 0.9/0.95, eps 1e-8, no weight decay), clipping 1.0, fp32, the same torch threads.

  lmforge  the real SFT data path (prepare_sft_data: chat template, train_on=assistant, packing)
           and Trainer.fit with SFTObjective (the output layer runs on the trained tokens only)
  trl      SFTTrainer, conversational prompt/completion data, completion_only_loss=True,
           packing=True (bfd, padding-free: the step's rows are flattened into one sequence with
           position_ids restarting per example, from which transformers builds the mask)

Each side runs in its own subprocess (a clean peak RSS). Tokens/s counts the same thing on both
sides, the real (non-padding) input tokens, over the steps after the first two, timed end of step
to end of step (data, forward, backward, clipping, optimizer, logging). Both trained models are
then evaluated the same way, by lmforge's evaluation on the same held-out conversations.

TRL trains on one token more per example than lmforge: the "\\n" that SmolLM2's template puts
after the assistant's <|im_end|> is part of TRL's completion. The benchmark takes that token out
of TRL's labels (so both sides train on the same tokens) and prints both counts; pass
--trl-native-labels to keep TRL's own labels. With seed 0 both sides happen to pack the same
rows and draw them in the same order (torch.randperm seeded with 0), so their per-step train losses
agree to about 3 decimals; the benchmark prints whether the per-step token counts are identical.

Where the time differs, on a CPU: TRL's fused LM head scores only the labelled positions on
Triton devices and every position elsewhere (here, with entropy and top-1 besides), and its
padding-free batch is one flattened row, so SDPA attends over (rows x seq_len)^2 under a
block-diagonal mask, where lmforge attends within each row. lmforge pads rows to seq_len; TRL
has no padding at all. Ends with one JSON line.

    python benchmarks/bench_sft.py [--steps 12] [--seq-len 256] [--batch-size 4] [--examples 300]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WARMUP_STEPS = 2            # steps left out of tokens/s (allocator and kernel warm-up)
MODEL = "smollm2-135m-instruct"
SEED = 0
BETAS, EPS = (0.9, 0.95), 1e-8


def data_reference(examples: int) -> str:
    return f"reasoning-gym:chain_sum?size={examples}&seed={SEED}"


def lmforge_config(args: argparse.Namespace, out_dir: str):
    from lmforge.train.sft import load_sft_config

    return load_sft_config(None, [
        f"model={MODEL}", f"data={data_reference(args.examples)}", f"val_examples={args.val_examples}",
        f"seq_len={args.seq_len}", f"batch_size={args.batch_size}", "grad_accum=1", "packing=true",
        "train_on=assistant", f"max_steps={args.steps}", f"lr={args.lr}", f"min_lr={args.lr}", "schedule=constant",
        "warmup_steps=0", "weight_decay=0", f"beta1={BETAS[0]}", f"beta2={BETAS[1]}", f"eps={EPS}", "grad_clip=1.0",
        "precision=fp32", "device=cpu", "progress=false", "eval_at_start=false", "eval_prompts=0",
        "checkpoint_interval=0", "log_interval=1", f"seed={SEED}", f"out_dir={out_dir}", "name=lmforge"])


def held_out_split(count: int, val_examples: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) conversation indices, chosen exactly as lmforge.train.sft_data does."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order[val_examples:], order[:val_examples]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2   # Linux: KiB


class StepClock:
    """Wall and process CPU time at the start and at the end of every optimizer step."""

    def __init__(self) -> None:
        self.start = self.cpu_start = 0.0
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.peak = 0.0

    def begin(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.peak = peak_rss_gb()    # after the last step: before the final save and export

    def figures(self, tokens: list[int], threads: int) -> dict:
        """Per-step seconds, and tokens/s over the steps after the warm-up (end of step to end of step).

        cpu_utilization: process CPU seconds / (wall seconds x threads) over the timed steps; well
        below 1 means the run was starved by other processes (rerun it)."""
        ends, cpu = self.ends, self.cpu_ends
        seconds = [b - a for a, b in zip([self.start, *ends], ends)]
        skip = min(WARMUP_STEPS, len(ends) - 1)
        wall = ends[-1] - (ends[skip - 1] if skip else self.start)
        cpu_seconds = cpu[-1] - (cpu[skip - 1] if skip else self.cpu_start)
        measured = sum(tokens[skip:len(ends)])
        timed = seconds[skip:]
        return {"step_seconds": [round(s, 3) for s in seconds], "timed_steps": len(timed),
                "timed_seconds": round(wall, 3), "timed_tokens": measured, "tokens_per_s": measured / wall,
                "median_step_s": sorted(timed)[len(timed) // 2], "cpu_utilization": cpu_seconds / (wall * threads),
                "steps": len(ends), "peak_rss_gb": self.peak, "step_tokens": tokens[:len(ends)]}


# ---------------------------------------------------------------------- lmforge (child process)

def run_lmforge(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lmforge.model.loading import export, load
    from lmforge.train import Trainer
    from lmforge.train.objectives import SFTObjective
    from lmforge.train.sft_data import prepare_sft_data

    config = lmforge_config(args, str(work / "runs"))
    started = time.perf_counter()
    model, tokenizer = load(config.model)
    data = prepare_sft_data(config, tokenizer)
    rss_loaded = peak_rss_gb()

    class Counted:
        """The SFT batch source, counting each batch's real and trained tokens."""

        def __init__(self, inner) -> None:
            self.inner, self.tokens, self.trained, self.rows = inner, [], [], []

        def next_batch(self):
            batch = self.inner.next_batch()
            self.tokens.append(int(batch["attention_mask"].sum()))
            self.trained.append(int((batch["labels"] != -100).sum()))
            self.rows.append(int(batch["input_ids"].shape[0]))
            return batch

        def state_dict(self):
            return self.inner.state_dict()

        def load_state_dict(self, state):
            self.inner.load_state_dict(state)

    class Clock(StepClock):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict] = []     # the Trainer's logged row of every step

        def on_step_end(self, trainer, step, row) -> None:    # a Trainer hook: after every step
            self.step_end()
            self.rows.append(row)

    source, clock = Counted(data.train), Clock()
    trainer = Trainer(model.float(), SFTObjective(), source, config, run_dir=config.run_dir, hooks=[clock])
    clock.begin()
    trainer.fit()
    export(trainer.raw, tokenizer, work / "lmforge_model", "lmforge")
    figures = clock.figures(source.tokens, args.threads)
    logged = [row["tokens_per_s"] for row in clock.rows[WARMUP_STEPS:] if "tokens_per_s" in row]
    example = data.train.examples[0]
    return {**figures, "rss_after_load_gb": rss_loaded,
            "seconds": time.perf_counter() - started, "rows_per_step": source.rows[0],
            "trained_tokens": sum(source.trained[:len(clock.ends)]),
            "input_tokens": sum(source.tokens[:len(clock.ends)]),
            "padded_tokens": sum(source.rows[:len(clock.ends)]) * config.seq_len,
            "epoch_tokens": data.train_tokens, "epoch_trained_tokens": data.trained_tokens,
            "epoch_rows": len(data.train.rows), "train_examples": len(data.train.examples),
            "train_loss": [round(row["loss"], 4) for row in clock.rows],
            # the Trainer's own figure (metrics.jsonl): it counts input_ids.numel(), padding included
            "logged_tokens_per_s": sum(logged) / len(logged) if logged else None,
            "optimizer": config.optimizer, "example_ids": example.ids, "example_mask": example.mask}


# ---------------------------------------------------------------------- TRL (child process)

def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    try:
        import trl
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        raise SystemExit("bench_sft.py needs TRL: pip install -e .[bench]") from None
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from lmforge.data.conversations import read_conversations

    started = time.perf_counter()
    hf_dir = work / "hf_base"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    conversations = read_conversations(data_reference(args.examples))
    train_indices, _ = held_out_split(len(conversations), args.val_examples, SEED)

    def prompt_completion(index: int) -> dict:
        messages = conversations[index].messages
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    records = [prompt_completion(i) for i in train_indices]
    sft_args = SFTConfig(
        output_dir=str(work / "trl_out"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, max_grad_norm=1.0,
        packing=True, packing_strategy="bfd", max_length=args.seq_len, completion_only_loss=True,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=SEED, data_seed=SEED,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer)

    # TRL's tokenization of the first training example, through its own preparation (unpacked).
    single = trainer._prepare_dataset(Dataset.from_list(records[:1]), tokenizer, sft_args, False, None, "check")[0]
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", tokenizer.eos_token)}

    def trained_count(dataset) -> int:
        return sum(sum(label != -100 for label in row) for row in dataset["labels"])

    native_trained = trained_count(trainer.train_dataset)
    native_example = [int(label != -100) for label in single["labels"]]

    # lmforge trains on an assistant turn through its end-of-turn token; TRL's completion also
    # holds what the template puts after it ("\n"). Unless --trl-native-labels, that tail is
    # unlabelled in every packed example (and in the checked one).
    def trim(row: dict) -> dict:
        labels, start = list(row["labels"]), 0
        for length in row.get("seq_lengths") or [len(labels)]:
            end = start + length
            stops = [t for t in range(start, end) if labels[t] != -100 and row["input_ids"][t] in stop_ids]
            if stops:
                labels[stops[-1] + 1:end] = [-100] * (end - stops[-1] - 1)
            start = end
        return {"labels": labels}

    if not args.trl_native_labels:
        trainer.train_dataset = trainer.train_dataset.map(trim)
        single = {**single, **trim(single)}

    counts: dict[str, list[int]] = {"tokens": [], "trained": [], "rows": []}
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        # Padding-free: one flattened row, no padding; otherwise count the attention mask.
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        counts["tokens"].append(int(real))
        counts["trained"].append(int((batch["labels"][:, 1:] != -100).sum()))   # the model shifts labels
        counts["rows"].append(len(examples))
        return batch

    trainer.data_collator = counting_collator

    class Clock(StepClock, TrainerCallback):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []

        def on_train_begin(self, *_, **__):
            self.begin()

        def on_step_end(self, *_, **__):
            self.step_end()

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 4))

    clock = Clock()
    trainer.add_callback(clock)
    rss_loaded = peak_rss_gb()
    trainer.train()
    trainer.save_model(str(work / "trl_model"))
    figures = clock.figures(counts["tokens"], args.threads)
    steps = figures["steps"]
    return {**figures, "rss_after_load_gb": rss_loaded,
            "seconds": time.perf_counter() - started, "rows_per_step": counts["rows"][0],
            "trained_tokens": sum(counts["trained"][:steps]), "input_tokens": sum(counts["tokens"][:steps]),
            "epoch_tokens": sum(len(row) for row in trainer.train_dataset["input_ids"]),
            "epoch_trained_tokens": trained_count(trainer.train_dataset),
            "epoch_trained_tokens_native": native_trained,
            "epoch_rows": len(trainer.train_dataset), "train_examples": len(records), "train_loss": clock.losses,
            "padding_free": bool(getattr(trainer, "padding_free", False)), "optimizer": str(sft_args.optim),
            "attn_implementation": model.config._attn_implementation, "trl_version": trl.__version__,
            "example_ids": list(single["input_ids"]),
            "example_labels": [int(label != -100) for label in single["labels"]],
            "example_labels_native": native_example}


# ---------------------------------------------------------------------- evaluation (child process)

def run_eval(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lmforge.eval import evaluate_objective
    from lmforge.model.loading import load
    from lmforge.train.objectives import SFTObjective
    from lmforge.train.sft_data import prepare_sft_data

    results = {}
    data = None
    for name, reference in (("base", MODEL), ("lmforge", work / "lmforge_model"), ("trl", work / "trl_model")):
        model, tokenizer = load(str(reference))
        if data is None:     # the held-out conversations, tokenized and packed once by lmforge
            data = prepare_sft_data(lmforge_config(args, str(work / "runs")), tokenizer)
        with torch.no_grad():
            metrics = evaluate_objective(model.float().eval(), SFTObjective(), data.val.iter_fixed())
        results[name] = {"val_loss": metrics["val_loss"], "val_accuracy": metrics.get("val_accuracy")}
    results["val_trained_tokens"] = sum(sum(example.mask) for example in data.val.examples)
    return results


# ---------------------------------------------------------------------- the parent

def child(role: str, args: argparse.Namespace, work: Path) -> dict:
    """Run one side in a fresh interpreter; its JSON comes back through a file."""
    out = work / f"{role}.json"
    log = work / f"{role}.log"
    flags = ["--steps", args.steps, "--seq-len", args.seq_len, "--batch-size", args.batch_size,
             "--examples", args.examples, "--val-examples", args.val_examples, "--lr", args.lr,
             "--threads", args.threads] + (["--trl-native-labels"] if args.trl_native_labels else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                                   os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(log, "w") as stream:
        code = subprocess.call([sys.executable, __file__, "--role", role, "--work", str(work),
                                *map(str, flags)], stdout=stream, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"bench_sft.py: the {role} run failed (exit {code}); its last output:\n{tail}")
    print(f"  {role}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return json.loads(out.read_text())


def machine() -> dict:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"cpu": name, "native_bf16": bool({"avx512_bf16", "amx_bf16"} & set(flags)),
            "torch": torch.__version__, "cores": os.cpu_count()}


def export_base(work: Path) -> None:
    """The bundled SmolLM2 as an HF directory, for transformers (nothing is downloaded)."""
    from lmforge.model.loading import export, load

    model, tokenizer = load(MODEL)
    export(model, tokenizer, work / "hf_base", "hf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps on each side (the first 2 untimed)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed row")
    parser.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    parser.add_argument("--examples", type=int, default=300, help="chain_sum conversations generated")
    parser.add_argument("--val-examples", type=int, default=32, help="of which held out for the val loss")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per side")
    parser.add_argument("--trl-native-labels", action="store_true",
                        help="keep TRL's labels (it also trains on the '\\n' after <|im_end|>)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (models, logs, per-side JSON)")
    parser.add_argument("--role", choices=["lmforge", "trl", "eval"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS} (the warm-up steps are not timed)")

    if args.role:
        work = Path(args.work)
        result = {"lmforge": run_lmforge, "trl": run_trl, "eval": run_eval}[args.role](args, work)
        (work / f"{args.role}.json").write_text(json.dumps(result))
        return

    if importlib.util.find_spec("trl") is None:     # checked first: nothing runs for minutes before failing
        raise SystemExit("bench_sft.py needs TRL (the reference it compares against): pip install -e .[bench]")
    host = machine()
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as directory:
        work = Path(args.keep or directory)
        work.mkdir(parents=True, exist_ok=True)
        export_base(work)
        sides = {"lmforge": child("lmforge", args, work), "trl": child("trl", args, work)}
        quality = child("eval", args, work)

    ours, theirs = sides["lmforge"], sides["trl"]
    same_ids = ours["example_ids"] == theirs["example_ids"]
    same_mask = ours["example_mask"][1:] == theirs["example_labels"][1:]   # position 0 is never trained
    print(f"SFT {MODEL} on {data_reference(args.examples)}: {ours['train_examples']} train / {args.val_examples} "
          f"held-out conversations, packed rows of {args.seq_len}, {args.batch_size} rows/step, {args.steps} steps "
          f"(first {WARMUP_STEPS} untimed), fp32, lr {args.lr:g} constant")
    print(f"machine: {host['cpu']}, native bf16 {'yes' if host['native_bf16'] else 'no'}, {args.threads} threads "
          f"(of {host['cores']} cores), torch {host['torch']}, trl {theirs['trl_version']}")
    print(f"tokens/epoch: lmforge {ours['epoch_tokens']:,} in {ours['epoch_rows']} rows, trained on "
          f"{ours['epoch_trained_tokens']:,}; trl {theirs['epoch_tokens']:,} in {theirs['epoch_rows']} rows, trained "
          f"on {theirs['epoch_trained_tokens']:,} (TRL's own labels: {theirs['epoch_trained_tokens_native']:,}"
          f"{'' if args.trl_native_labels else ', less the newline after each <|im_end|>'})")
    print(f"first training example: {len(ours['example_ids'])} tokens, ids {'equal' if same_ids else 'DIFFER'}; "
          f"trained positions {'equal' if same_mask else 'DIFFER'}: lmforge {sum(ours['example_mask'])}, TRL "
          f"{sum(theirs['example_labels'])} (TRL's own labels {sum(theirs['example_labels_native'])})")
    same_batches = ours["step_tokens"] == theirs["step_tokens"]
    print(f"real tokens per step: lmforge {ours['step_tokens']}, trl {theirs['step_tokens']}"
          + (" (the same rows in the same order)" if same_batches else ""))
    print(f"trl: padding_free={theirs['padding_free']}, attention {theirs['attn_implementation']}, optimizer "
          f"{theirs['optimizer']}; lmforge optimizer {ours['optimizer']}")
    header = (f"{'':<9}{'tokens/s':>10}{'peak RSS GB':>13}{'steps':>7}{'tokens':>9}{'trained':>9}"
              f"{'val loss':>10}{'step s':>8}{'seconds':>9}")
    print(header)
    for name, side in sides.items():
        print(f"{name:<9}{side['tokens_per_s']:>10.1f}{side['peak_rss_gb']:>13.2f}{side['steps']:>7}"
              f"{side['input_tokens']:>9,}{side['trained_tokens']:>9,}{quality[name]['val_loss']:>10.4f}"
              f"{side['median_step_s']:>8.2f}{side['seconds']:>9.1f}")
    for name, side in sides.items():
        print(f"{name} step seconds {side['step_seconds']}, CPU use over the timed steps "
              f"{side['cpu_utilization']:.0%} of {args.threads} threads")
    disturbed = [name for name, side in sides.items() if side["cpu_utilization"] < 0.8]
    if disturbed:
        print(f"WARNING: {', '.join(disturbed)} got under 80% of its threads' CPU time: other processes were "
              "running; rerun for a clean measurement")
    print(f"base model val loss {quality['base']['val_loss']:.4f}; train loss lmforge {ours['train_loss']}, "
          f"trl {theirs['train_loss']}")
    if ours.get("logged_tokens_per_s"):
        print(f"(lmforge's own logged tokens_per_s counts padding: {ours['logged_tokens_per_s']:.1f}; "
              f"{ours['input_tokens']:,} real of {ours['padded_tokens']:,} row tokens)")
    figures = {
        "bench": "sft", "model": MODEL, "data": data_reference(args.examples), "steps": args.steps,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "threads": args.threads, "cpu": host["cpu"],
        "native_bf16": host["native_bf16"], "torch": host["torch"], "trl": theirs["trl_version"],
        "tokens_per_s_lmforge": round(ours["tokens_per_s"], 1), "tokens_per_s_trl": round(theirs["tokens_per_s"], 1),
        "tokens_per_s_ratio_lmforge_over_trl": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        "peak_rss_gb_lmforge": round(ours["peak_rss_gb"], 3), "peak_rss_gb_trl": round(theirs["peak_rss_gb"], 3),
        "peak_rss_ratio": round(ours["peak_rss_gb"] / theirs["peak_rss_gb"], 3),
        "val_loss_base": round(quality["base"]["val_loss"], 4),
        "val_loss_lmforge": round(quality["lmforge"]["val_loss"], 4),
        "val_loss_trl": round(quality["trl"]["val_loss"], 4),
        "trained_tokens_lmforge": ours["trained_tokens"], "trained_tokens_trl": theirs["trained_tokens"],
        "epoch_trained_tokens_lmforge": ours["epoch_trained_tokens"],
        "epoch_trained_tokens_trl": theirs["epoch_trained_tokens"],
        "epoch_trained_tokens_trl_native": theirs["epoch_trained_tokens_native"],
        "example_ids_equal": same_ids, "example_trained_positions_equal": same_mask, "same_batches": same_batches,
        "cpu_utilization_lmforge": round(ours["cpu_utilization"], 3),
        "cpu_utilization_trl": round(theirs["cpu_utilization"], 3), "disturbed": bool(disturbed),
        "median_step_s_lmforge": round(ours["median_step_s"], 3),
        "median_step_s_trl": round(theirs["median_step_s"], 3),
        "seconds_lmforge": round(ours["seconds"], 1), "seconds_trl": round(theirs["seconds"], 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
