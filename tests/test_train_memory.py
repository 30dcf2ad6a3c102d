"""train/memory.py: trim_host_memory (malloc_trim after the forward and every N-th block, outputs unchanged)."""
from __future__ import annotations

import sys

import pytest
import torch

from lmforge.errors import UserError
from lmforge.model import build_model, get_preset
from lmforge.train import memory
from lmforge.train.memory import trim_host_memory

# Linux runs (CI included) must have glibc's malloc_trim: a missing one fails the tests there.
glibc = pytest.mark.skipif(sys.platform != "linux", reason="malloc_trim is glibc's; this is not Linux")


@glibc
def test_trims_after_the_forward_and_every_nth_block_without_changing_outputs(monkeypatch):
    torch.manual_seed(0)
    model = build_model(get_preset("nano")).eval()
    blocks = len(model.transformer.blocks)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    expected = model(ids)
    calls = []
    real = memory.malloc_trim
    monkeypatch.setattr(memory, "malloc_trim", lambda: calls.append(1) or real())
    handles = trim_host_memory(model, every=2)
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
    assert len(calls) == 1 + blocks // 2 and len(handles) == 1 + blocks // 2
    for handle in handles:
        handle.remove()
    model(ids)
    assert len(calls) == 1 + blocks // 2


def test_a_bad_interval_is_a_clear_error():
    with pytest.raises(UserError, match="trim_host_memory=0: give the number of blocks"):
        trim_host_memory(build_model(get_preset("nano")), every=0)


@glibc
def test_the_trainer_installs_the_hooks_from_the_config(tmp_path):
    from lmforge.train import TrainConfig, Trainer
    from lmforge.train.objectives import CausalLMObjective

    from train_support import CountingBatches, tiny_gpt

    model = tiny_gpt()
    config = TrainConfig(max_steps=2, batch_size=2, device="cpu", progress=False, eval_interval=0,
                         checkpoint_interval=0, trim_host_memory=1)
    result = Trainer(model, CausalLMObjective(), CountingBatches(2, 16), config, run_dir=tmp_path / "run").fit()
    hooked = [module for module in model.modules() if module._forward_hooks]
    assert len(hooked) == 1 + len(model.transformer.blocks)
    assert len(result.history) >= 1 and all(row["loss"] == row["loss"] for row in result.history if "loss" in row)
