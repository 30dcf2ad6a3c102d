"""Shared helpers for the tests/test_train_*.py files: tiny real models and batch sources."""
from __future__ import annotations

import torch

from lmforge.model import build_model, get_preset
from lmforge.train import CausalLMObjective
from lmforge.train.losses import token_logprobs

VOCAB = 64


def tiny_gpt(seed: int = 0, **overrides) -> torch.nn.Module:
    """lmforge's real GPT at the `nano` preset (2 layers, d_model 64) with a 64-token vocabulary."""
    torch.manual_seed(seed)
    return build_model(get_preset("nano", vocab_size=VOCAB, **overrides))


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(get_preset("bert-nano", vocab_size=VOCAB))


class CountingBatches:
    """Learnable causal-LM batches: each row counts up from a random start (mod VOCAB).

    Batch k is drawn from a generator seeded by (seed, k), so the stream is resumable by its step.
    With `padded`, row i keeps only its first T - (i % 4) * 3 tokens: right padding with
    attention_mask 0 and labels -100, so rows have different numbers of predicted tokens.
    """

    def __init__(self, batch_size: int, seq_len: int, seed: int = 0, padded: bool = False,
                 rows: slice | None = None) -> None:
        self.batch_size, self.seq_len, self.seed, self.padded = batch_size, seq_len, seed, padded
        self.rows = rows          # take only these rows of each generated batch (a rank's share)
        self.step = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.step)
        self.step += 1
        start = torch.randint(0, VOCAB, (self.batch_size, 1), generator=generator)
        sequence = (start + torch.arange(self.seq_len + 1)) % VOCAB
        batch = {"input_ids": sequence[:, :-1].clone(), "labels": sequence[:, 1:].clone()}
        if self.padded:
            lengths = self.seq_len - (torch.arange(self.batch_size) % 4) * 3
            mask = (torch.arange(self.seq_len)[None, :] < lengths[:, None]).long()
            batch["input_ids"] = batch["input_ids"].masked_fill(mask == 0, 0)
            batch["labels"] = batch["labels"].masked_fill(mask == 0, -100)
            batch["attention_mask"] = mask
        if self.rows is not None:
            batch = {key: value[self.rows] for key, value in batch.items()}
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


class SplitBatches:
    """Serves the rows of another source's batches `per_batch` rows at a time (same data, smaller
    micro-batches): with grad_accum = rows / per_batch, one optimizer step sees the same rows."""

    def __init__(self, source: CountingBatches, per_batch: int) -> None:
        self.source, self.per_batch = source, per_batch
        self.pending: list[dict[str, torch.Tensor]] = []

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.pending:
            batch = self.source.next_batch()
            rows = batch["input_ids"].size(0)
            self.pending = [{key: value[i:i + self.per_batch] for key, value in batch.items()}
                            for i in range(0, rows, self.per_batch)]
        return self.pending.pop(0)

    def state_dict(self) -> dict[str, int]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.source.load_state_dict(state)


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


class StopRun(Exception):
    """Raised by StopAt to end a run early, as a crash would."""


class StopAt:
    """A Trainer hook that stops the run at the end of `step` (on every rank alike)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step: int, row: dict) -> None:
        if step == self.step:
            raise StopRun


def distributed_worker(rank: int, world_size: int, port: int, out_dir: str, steps: int, shards: str) -> None:
    """One process of a 2-process gloo job (torch.multiprocessing.spawn target).

    Trains with DDP, then with FSDP2, then with FSDP2 stopped after step `steps` (whose last
    checkpoint is a step earlier) and resumed; saves each one's parameters and logged losses to
    out_dir/<run>/rank<r>.pt. Finally it runs `lmforge pretrain` on the real shards, as
    `torchrun -m lmforge pretrain` would.

    Global batch k has 4 rows; rank r trains on rows [2r, 2r + 2) of it, in 2 micro-batches of 1
    row (padded rows, so the ranks predict different numbers of tokens).
    """
    import os

    from lmforge import cli
    from lmforge.train import CausalLMObjective, Trainer, TrainConfig
    from lmforge.train.checkpoint import latest_checkpoint
    from lmforge.train.distributed import full_tensor, init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    context = init_distributed("cpu")

    def trainer(strategy: str, run: str, checkpoint_interval: int = 0) -> Trainer:
        source = SplitBatches(CountingBatches(4, 16, padded=True, rows=slice(2 * rank, 2 * rank + 2)), 1)
        config = TrainConfig(max_steps=steps, batch_size=1, grad_accum=2, lr=1e-2, warmup_steps=0, log_interval=1,
                             eval_interval=0, checkpoint_interval=checkpoint_interval, progress=False,
                             distributed=strategy, ema_decay=0.5)
        return Trainer(tiny_gpt(seed=rank), CausalLMObjective(), source, config, run_dir=f"{out_dir}/{run}",
                       context=context)

    def save(trainer: Trainer, result, run: str) -> None:
        params = {name: full_tensor(param.detach()).clone() for name, param in trainer.raw.named_parameters()}
        torch.save({"params": params, "losses": [row["loss"] for row in result.history]},
                   f"{out_dir}/{run}/rank{rank}.pt")

    try:
        # Each rank builds its model from another seed: both strategies must start from rank 0's weights.
        for strategy in ("ddp", "fsdp"):
            run = trainer(strategy, strategy)
            save(run, run.fit(), strategy)
        stopped = trainer("fsdp", "fsdp-resumed", checkpoint_interval=steps - 1)
        stopped.hooks.append(StopAt(steps))
        try:
            stopped.fit()
        except StopRun:
            pass
        resumed = trainer("fsdp", "fsdp-resumed", checkpoint_interval=steps - 1)
        save(resumed, resumed.fit(resume_from=latest_checkpoint(f"{out_dir}/fsdp-resumed")), "fsdp-resumed")

        # An objective with a frozen reference model (its log-probs computed in `prepare`), under
        # both strategies; each rank builds the reference from another seed, so the Trainer must
        # give every process rank 0's (broadcast under DDP, sharded under FSDP).
        for strategy in ("ddp", "fsdp"):
            source = SplitBatches(CountingBatches(4, 16, padded=True, rows=slice(2 * rank, 2 * rank + 2)), 1)
            config = TrainConfig(max_steps=steps, batch_size=1, grad_accum=2, lr=1e-2, warmup_steps=0,
                                 log_interval=1, eval_interval=0, checkpoint_interval=0, progress=False,
                                 distributed=strategy)
            anchored = Trainer(tiny_gpt(seed=rank), ReferenceAnchored(), source, config,
                               run_dir=f"{out_dir}/anchored-{strategy}", context=context,
                               frozen_models={"reference": tiny_gpt(seed=10 + rank)})
            save(anchored, anchored.fit(), f"anchored-{strategy}")

        code = cli.main(["pretrain", "--config", "shakespeare-gpt", f"data={shards}", f"out_dir={out_dir}",
                         "name=cli", "preset=nano", "seq_len=64", "batch_size=8", "max_steps=6", "log_interval=3",
                         "eval_interval=6", "eval_batches=2", "checkpoint_interval=6", "sample_tokens=0",
                         "peak_flops=1e12", "progress=false"])
        torch.save({"exit_code": code}, f"{out_dir}/cli-rank{rank}.pt")
        # SFT of that run in 2 processes (DDP): 2 rows per process = the 4-row global batch of the
        # single-process run the test compares it with.
        code = cli.main(sft_arguments(f"{out_dir}/cli", f"{out_dir}/chats.jsonl", out_dir, "sft-ddp", batch_size=2))
        torch.save({"exit_code": code}, f"{out_dir}/sft-rank{rank}.pt")
    finally:
        shutdown_distributed(context)


class ReferenceAnchored(CausalLMObjective):
    """Causal-LM loss plus a squared log-prob distance to a frozen reference, whose log-probs come
    from `prepare` (a DPO/PPO-shaped use of frozen models)."""

    def setup(self, ctx) -> None:
        self.reference = ctx.frozen["reference"]

    def prepare(self, batch, ctx):
        with ctx.autocast():
            batch["ref_logps"] = token_logprobs(self.reference(batch["input_ids"]), batch["labels"])
        return batch

    def __call__(self, model, batch):
        output = super().__call__(model, batch)
        logps = token_logprobs(model(batch["input_ids"]), batch["labels"])
        output.loss = output.loss + (logps - batch["ref_logps"]).square().sum()
        return output


def sft_arguments(model: str, data: str, out_dir: str, name: str, **extra) -> list[str]:
    """`lmforge sft` arguments for a short SFT run of a small model on the arithmetic chats."""
    settings = dict(model=model, data=data, out_dir=out_dir, name=name, seq_len=64, batch_size=4, max_steps=4,
                    lr=3e-3, warmup_steps=0, schedule="constant", log_interval=1, eval_interval=4,
                    checkpoint_interval=4, val_examples=8, eval_prompts=2, answer_tokens=4, progress=False,
                    peak_flops=1e12, precision="fp32")   # auto picks bf16 on CPUs with AMX: keep runs comparable
    settings.update(extra)
    return ["sft", *(f"{key}={value}" for key, value in settings.items())]


def write_arithmetic_chats(path, n: int = 120):
    """Alpaca records 'What is a plus b?' -> 'a+b': a small learnable instruction set."""
    import json
    from pathlib import Path

    rows = [{"instruction": f"What is {a} plus {b}?", "output": str(a + b)}
            for a, b in ((i % 10, (i * 7) % 10) for i in range(n))]
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return Path(path)


def make_shakespeare_shards(root) -> tuple[str, str]:
    """A 512-token BPE tokenizer and shards from 4 real plays (the first one held out): a few seconds.

    Built once per test session under `root`; returns (shard directory, tokenizer directory)."""
    import shutil
    from pathlib import Path

    from lmforge.assets import shakespeare_play_files
    from lmforge.data import prepare_shards
    from lmforge.tokenizer import train_bpe

    root = Path(root)
    shards, tokenizer = root / "shards", root / "tokenizer"
    if not (shards / "meta.json").is_file():
        corpus = root / "plays"
        corpus.mkdir(parents=True, exist_ok=True)
        files = shakespeare_play_files()[:4]
        for file in files:
            shutil.copy(file, corpus / file.name)
        train_bpe([str(file) for file in files], vocab_size=512, num_workers=1).save(tokenizer)
        prepare_shards(corpus, tokenizer, shards, val_fraction=0.25, num_workers=1, progress=False)
    return str(shards), str(tokenizer)
