"""Helpers for tests/test_align_*.py: synthetic token pairs and pair files with a learnable preference."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.align.data import PairBatches, TokenizedPair

from train_support import VOCAB


def token_pairs(n: int = 24, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of token sequences: a prompt of 4-7 tokens, then the chosen reply counts up from the
    prompt's last token, the rejected reply repeats random tokens (a preference a tiny GPT can learn)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for index in range(n):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(4, 8, (1,), generator=g)),), generator=g).tolist()
        length = int(torch.randint(3, 7, (1,), generator=g))
        chosen = [(prompt[-1] + k + 1) % VOCAB for k in range(length)]
        rejected = torch.randint(1, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        pairs.append(TokenizedPair(index, prompt + chosen, [0] * len(prompt) + [1] * len(chosen),
                                   prompt + rejected, [0] * len(prompt) + [1] * len(rejected)))
    return pairs


def pair_batches(batch_size: int = 4, rank: int = 0, world_size: int = 1, n: int = 24) -> PairBatches:
    return PairBatches(token_pairs(n), batch_size, pad_id=0, seed=0, rank=rank, world_size=world_size)


def write_arithmetic_pairs(path: Path, n: int = 80) -> Path:
    """'What is a plus b?' -> chosen the sum, rejected a wrong sum (conversational and standard lines mixed)."""
    rows = []
    for i in range(n):
        a, b = i % 10, (i * 7) % 10
        wrong = (a + b + 1 + i % 3) % 19
        if i % 2:
            rows.append({"prompt": f"What is {a} plus {b}?", "chosen": str(a + b), "rejected": str(wrong)})
        else:
            rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                         "chosen": [{"role": "assistant", "content": str(a + b)}],
                         "rejected": [{"role": "assistant", "content": str(wrong)}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def dpo_arguments(tokenizer_dir: str, pairs: Path, out_dir: Path, name: str, **extra) -> list[str]:
    settings = dict(model="nano", tokenizer=tokenizer_dir, pairs=pairs, out_dir=out_dir, name=name, seq_len=64,
                    batch_size=4, max_steps=6, lr=3e-3, warmup_steps=0, schedule="constant", log_interval=1,
                    eval_interval=3, checkpoint_interval=3, val_pairs=8, progress=False, beta=0.5)
    settings.update(extra)
    return ["align", "dpo", *(f"{key}={value}" for key, value in settings.items())]


def ddp_dpo_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One process of a 2-process gloo DPO run: 2 pairs per process = the single run's 4-pair batch.
    Each rank builds its policy and reference from another seed: the Trainer must start every
    process from rank 0's weights (policy broadcast by DDP, frozen reference broadcast by the Trainer)."""
    import os

    from lmforge.align.preference import PreferenceObjective
    from lmforge.train import Trainer, TrainConfig
    from lmforge.train.distributed import init_distributed, shutdown_distributed

    from train_support import tiny_gpt

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    context = init_distributed("cpu")
    try:
        config = TrainConfig(max_steps=4, batch_size=2, lr=3e-3, warmup_steps=0, schedule="constant", log_interval=1,
                             eval_interval=0, checkpoint_interval=0, progress=False, distributed="ddp")
        trainer = Trainer(tiny_gpt(seed=rank), PreferenceObjective("sigmoid", beta=0.5),
                          pair_batches(batch_size=2, rank=rank, world_size=world_size), config,
                          run_dir=f"{out_dir}/ddp", context=context, frozen_models={"reference": tiny_gpt(seed=5 * rank)})
        result = trainer.fit()
        torch.save({"params": {n: p.detach().clone() for n, p in trainer.raw.named_parameters()},
                    "losses": [row["loss"] for row in result.history]}, f"{out_dir}/rank{rank}.pt")
    finally:
        shutdown_distributed(context)
