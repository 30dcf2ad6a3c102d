"""Checkpoints: atomic saves, keep-last-K + best, exact resume."""
from __future__ import annotations

import pytest
import torch

from lmforge.train import CausalLMObjective, Trainer, TrainConfig
from lmforge.train import checkpoint as ckpt

from train_support import CountingBatches, tiny_gpt


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> TrainConfig:
    settings = dict(max_steps=6, lr=3e-3, warmup_steps=2, log_interval=1, eval_interval=0, checkpoint_interval=2,
                    progress=False, keep_last=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def _trainer(run_dir, **overrides) -> Trainer:
    return Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(4, 12, padded=True), _config(**overrides),
                   run_dir=run_dir)


class _Killed(BaseException):
    """Stands in for the process dying (not an Exception, like KeyboardInterrupt)."""


def test_a_save_interrupted_midway_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=4)
    original_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:            # the second checkpoint dies after its weights were written
            original_save({"partial": torch.zeros(1)}, path)
            raise _Killed
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(_Killed):
        trainer.fit()
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path))["step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))        # the half-written one was removed


def test_a_stale_temporary_from_a_killed_save_is_ignored_and_cleaned(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp-step-000008-abcd"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    assert ckpt.latest_checkpoint(tmp_path) is None
    _trainer(tmp_path, max_steps=2).fit()
    assert not stale.exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"


def test_keep_last_k_and_the_best_by_validation_loss(tmp_path):
    losses = iter([5.0, 3.0, 4.0, 4.5, 4.2, 4.1])       # best at the second evaluation (step 4)
    trainer = Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(4, 12), _config(max_steps=12, keep_last=2),
                      run_dir=tmp_path, evaluate=lambda model: {"val_loss": next(losses)})
    result = trainer.fit()
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [4, 10, 12]
    assert result.best == {"step": 4, "val_loss": 3.0, "checkpoint": "checkpoints/step-000004"}
    assert ckpt.read_best(tmp_path)["step"] == 4
    saved = ckpt.load_trainer_state(tmp_path / "checkpoints" / "step-000012")
    assert set(saved) >= {"step", "optimizer", "scaler", "schedule", "rng", "loader", "tokens", "elapsed_seconds"}
    assert saved["loader"] == [{"step": 12}]


def test_resume_after_a_crash_repeats_the_uninterrupted_run_exactly(tmp_path):
    uninterrupted = _trainer(tmp_path / "a", max_steps=8, ema_decay=0.9).fit()

    class Crash:
        def on_step_end(self, trainer, step, row):
            if step == 5:                # between the checkpoints at 4 and 6
                raise _Killed

    crashed = _trainer(tmp_path / "b", max_steps=8, ema_decay=0.9)
    crashed.hooks.append(Crash())
    with pytest.raises(_Killed):
        crashed.fit()
    resumed_trainer = Trainer(tiny_gpt(seed=123), CausalLMObjective(), CountingBatches(4, 12, padded=True),
                              _config(max_steps=8, ema_decay=0.9), run_dir=tmp_path / "b")
    resumed = resumed_trainer.fit(resume_from=ckpt.latest_checkpoint(tmp_path / "b"))
    expected = {row["step"]: (row["loss"], row["grad_norm"], row["lr"]) for row in uninterrupted.history}
    assert [row["step"] for row in resumed.history] == [5, 6, 7, 8]
    for row in resumed.history:
        assert (row["loss"], row["grad_norm"], row["lr"]) == expected[row["step"]]      # bit-exact
    for name, tensor in ckpt.load_tensors(tmp_path / "a" / "model.safetensors").items():
        assert torch.equal(tensor, ckpt.load_tensors(tmp_path / "b" / "model.safetensors")[name]), name


@pytest.mark.parametrize("damage", [
    lambda data: b"junk\n",                  # the unpickler fails with a raw KeyError (bad memo index)
    lambda data: data[: len(data) // 2],     # a truncated copy
])
def test_a_corrupt_trainer_state_names_the_file_and_the_way_back(tmp_path, damage):
    from lmforge.errors import UserError

    _trainer(tmp_path, max_steps=4).fit()
    state_file = tmp_path / "checkpoints" / "step-000004" / "trainer_state.pt"
    state_file.write_bytes(damage(state_file.read_bytes()))
    with pytest.raises(UserError, match=r"trainer_state\.pt' is corrupt.*delete the directory .*step-000004"):
        ckpt.load_trainer_state(state_file.parent)
    # The previous checkpoint is untouched and still resumes.
    assert ckpt.load_trainer_state(tmp_path / "checkpoints" / "step-000002")["step"] == 2


def test_trainer_state_still_loads_with_weights_only(tmp_path):
    from pathlib import PurePosixPath

    from lmforge.errors import UserError

    (tmp_path / "step-000001").mkdir()
    # Arbitrary objects are refused by the weights-only unpickler (and so become a UserError).
    torch.save({"step": 1, "evil": PurePosixPath("/x")}, tmp_path / "step-000001" / "trainer_state.pt")
    with pytest.raises(UserError, match="is corrupt"):
        ckpt.load_trainer_state(tmp_path / "step-000001")


def test_resuming_from_corrupt_weights_is_a_user_error(tmp_path):
    from lmforge.errors import UserError

    _trainer(tmp_path, max_steps=2).fit()
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    (checkpoint / "model.safetensors").write_bytes(b"garbage\n")
    with pytest.raises(UserError, match=r"model\.safetensors' is corrupt.*delete the directory"):
        _trainer(tmp_path, max_steps=4).fit(resume_from=checkpoint)
