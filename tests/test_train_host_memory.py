"""trim_host_memory: malloc_trim after the forward and every N-th block, outputs unchanged."""
from __future__ import annotations

import pytest
import torch

from lmforge.errors import UserError
from lmforge.model import build_model, get_preset
from lmforge.train import host_memory
from lmforge.train.host_memory import trim_host_memory

glibc = pytest.mark.skipif(host_memory._libc() is None, reason="the C library has no malloc_trim (not glibc)")


@glibc
def test_trims_after_the_forward_and_every_nth_block_without_changing_outputs(monkeypatch):
    torch.manual_seed(0)
    model = build_model(get_preset("nano")).eval()
    blocks = len(model.transformer.blocks)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    expected = model(ids)
    calls = []
    real = host_memory.malloc_trim
    monkeypatch.setattr(host_memory, "malloc_trim", lambda: calls.append(1) or real())
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

    model = build_model(get_preset("nano"))
    config = TrainConfig(max_steps=1, batch_size=2, device="cpu", progress=False, eval_interval=0,
                         checkpoint_interval=0, trim_host_memory=1)

    class Batches:
        def next_batch(self):
            return {"input_ids": torch.randint(0, model.config.vocab_size, (2, 17))}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    Trainer(model, CausalLMObjective(), Batches(), config, run_dir=tmp_path / "run")
    hooked = [module for module in model.modules() if module._forward_hooks]
    assert len(hooked) == 1 + len(model.transformer.blocks)
