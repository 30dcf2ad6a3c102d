"""2-process data parallelism on CPU (gloo): DDP and FSDP2 equal one process on the same global batch,
FSDP2 resumes exactly, and `lmforge pretrain` runs in 2 processes (as under `torchrun -m lmforge`)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmforge.track.tracker import read_jsonl
from lmforge.train import CausalLMObjective, Trainer, TrainConfig
from lmforge.train.checkpoint import list_checkpoints

from train_support import (CountingBatches, ReferenceAnchored, SplitBatches, distributed_worker, make_shakespeare_shards,
                           sft_arguments, tiny_gpt, write_arithmetic_chats)

STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process(tmp_path) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same global batches (4 rows = 2 ranks x 2 micro-batches of 1) in one process."""
    torch.set_num_threads(1)
    config = TrainConfig(max_steps=STEPS, batch_size=1, grad_accum=4, lr=1e-2, warmup_steps=0, log_interval=1,
                         eval_interval=0, checkpoint_interval=0, progress=False, ema_decay=0.5)
    trainer = Trainer(tiny_gpt(), CausalLMObjective(), SplitBatches(CountingBatches(4, 16, padded=True), 1), config,
                      run_dir=tmp_path / "single")
    result = trainer.fit()
    params = {name: param.detach().clone() for name, param in trainer.raw.named_parameters()}
    return params, [row["loss"] for row in result.history]


@pytest.mark.slow
def test_two_process_ddp_and_fsdp_match_one_process(tmp_path, tmp_path_factory):
    shards, _ = make_shakespeare_shards(tmp_path_factory.getbasetemp() / "train-shakespeare")
    write_arithmetic_chats(tmp_path / "chats.jsonl")
    mp.spawn(distributed_worker, args=(2, _free_port(), str(tmp_path), STEPS, shards), nprocs=2, join=True)
    single_params, single_losses = _single_process(tmp_path)
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        rank0 = torch.load(out / "rank0.pt", weights_only=True)
        rank1 = torch.load(out / "rank1.pt", weights_only=True)
        # Every rank ends with exactly the same weights...
        for name, param in rank0["params"].items():
            assert torch.equal(param, rank1["params"][name]), (strategy, name)
        # ...equal to one process trained on the same global batches (up to float summation order).
        for name, param in rank0["params"].items():
            torch.testing.assert_close(param, single_params[name], rtol=1e-4, atol=1e-5, msg=f"{strategy} {name}")
        assert rank0["losses"] == pytest.approx(single_losses, rel=1e-5)
        assert rank0["losses"] == rank1["losses"]               # the logged loss is the global one
        # Only rank 0 wrote the run; its exported (EMA) weights equal the single process's.
        exported = load_file(out / "model.safetensors")
        for name, tensor in load_file(tmp_path / "single" / "model.safetensors").items():
            torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{strategy} {name}")
        assert sorted(path.name for path in out.iterdir()) == ["checkpoints", "config.json", "model.safetensors",
                                                              "rank0.pt", "rank1.pt"]

    # FSDP stopped after the step-2 checkpoint and resumed from it: the same weights, bit for bit.
    for rank in (0, 1):
        resumed = torch.load(tmp_path / "fsdp-resumed" / f"rank{rank}.pt", weights_only=True)["params"]
        for name, param in torch.load(tmp_path / "fsdp" / f"rank{rank}.pt", weights_only=True)["params"].items():
            assert torch.equal(resumed[name], param), name

    # The CLI in 2 processes: both exit 0, only rank 0 wrote (one row per logged step, one
    # checkpoint), and every step consumed both processes' batches.
    assert [torch.load(tmp_path / f"cli-rank{rank}.pt")["exit_code"] for rank in (0, 1)] == [0, 0]
    rows = read_jsonl(tmp_path / "cli" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 3, 6]
    assert rows[-1]["tokens_seen"] == 6 * 2 * 8 * 64 and "val_loss" in rows[-1]
    assert [step for step, _ in list_checkpoints(tmp_path / "cli")] == [6]

    # `lmforge sft` of that run in 2 processes (DDP, 2 rows each) equals 1 process with 4 rows.
    assert [torch.load(tmp_path / f"sft-rank{rank}.pt")["exit_code"] for rank in (0, 1)] == [0, 0]
    from lmforge import cli

    torch.set_num_threads(1)
    assert cli.main(sft_arguments(str(tmp_path / "cli"), str(tmp_path / "chats.jsonl"), str(tmp_path), "sft-single")) == 0
    ddp_rows = read_jsonl(tmp_path / "sft-ddp" / "metrics.jsonl")
    single_rows = read_jsonl(tmp_path / "sft-single" / "metrics.jsonl")
    assert len(ddp_rows) == len(single_rows) == 5              # step 0 (the base model's evaluation) + 4 steps
    for ddp_row, single_row in zip(ddp_rows, single_rows):
        for key in ("loss", "val_loss"):
            assert (key in ddp_row) == (key in single_row)
            if key in ddp_row:
                assert ddp_row[key] == pytest.approx(single_row[key], rel=1e-5), (key, ddp_row["step"])
    assert ddp_rows[-1]["tokens_seen"] == single_rows[-1]["tokens_seen"]
    single = load_file(tmp_path / "sft-single" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "sft-ddp" / "model.safetensors").items():
        torch.testing.assert_close(tensor, single[name], rtol=1e-4, atol=1e-5, msg=name)

    # A frozen reference model through prepare/setup: 2 processes equal 1 process, DDP and FSDP.
    torch.manual_seed(0)
    config = TrainConfig(max_steps=STEPS, batch_size=1, grad_accum=4, lr=1e-2, warmup_steps=0, log_interval=1,
                         eval_interval=0, checkpoint_interval=0, progress=False)
    single = Trainer(tiny_gpt(), ReferenceAnchored(), SplitBatches(CountingBatches(4, 16, padded=True), 1), config,
                     run_dir=tmp_path / "anchored-single", frozen_models={"reference": tiny_gpt(seed=10)})
    single_losses = [row["loss"] for row in single.fit().history]
    for strategy in ("ddp", "fsdp"):
        rank0 = torch.load(tmp_path / f"anchored-{strategy}" / "rank0.pt", weights_only=True)
        assert rank0["losses"] == pytest.approx(single_losses, rel=1e-5), strategy
        for name, param in single.raw.named_parameters():
            torch.testing.assert_close(rank0["params"][name], param.detach(), rtol=1e-4, atol=1e-5,
                                       msg=f"{strategy} {name}")
