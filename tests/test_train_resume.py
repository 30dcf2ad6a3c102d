"""Resume keeps the best checkpoint, refuses a changed config, rewrites config.yaml only once the
checkpoint is restored, and cleans what a killed export left behind."""
from __future__ import annotations

import json

import pytest
import yaml

from lmforge import cli
from lmforge.train import CausalLMObjective, Trainer, TrainConfig
from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints, read_best

from train_support import CountingBatches, StopAt, StopRun, make_shakespeare_shards, tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

# The validation loss each step reports: best at step 1, worse after (a run that overfits).
SCRIPTED_VAL_LOSS = {1: 1.0, 2: 3.0, 3: 2.0, 4: 4.0, 5: 5.0, 6: 6.0}


def _scripted_trainer(run_dir) -> Trainer:
    config = TrainConfig(max_steps=6, lr=1e-2, warmup_steps=0, log_interval=1, eval_interval=1,
                         checkpoint_interval=1, keep_last=2, progress=False)
    trainer = Trainer(tiny_gpt(), CausalLMObjective(), CountingBatches(4, 8), config, run_dir=run_dir)
    trainer.evaluate = lambda model: {"val_loss": SCRIPTED_VAL_LOSS[trainer.step]}
    return trainer


def test_the_best_checkpoint_survives_a_resume(tmp_path):
    """Run C: 6 steps. Run D: killed after its step-1 checkpoint, then resumed to 6. Both keep step 1 as best."""
    _scripted_trainer(tmp_path / "C").fit()
    stopped = _scripted_trainer(tmp_path / "D")
    stopped.hooks.append(StopAt(2))      # after the step-1 checkpoint, before step 2's
    with pytest.raises(StopRun):
        stopped.fit()
    _scripted_trainer(tmp_path / "D").fit(resume_from=latest_checkpoint(tmp_path / "D"))
    for run in ("C", "D"):
        assert read_best(tmp_path / run)["step"] == 1, run
        assert [step for step, _ in list_checkpoints(tmp_path / run)] == [1, 5, 6], run


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "train-shakespeare")[0]


def _pretrain(shards: str, out_dir, **extra) -> list[str]:
    settings = dict(data=shards, out_dir=out_dir, name="run", preset="nano", seq_len=32, batch_size=4, max_steps=2,
                    lr=3e-3, warmup_steps=0, log_interval=1, eval_interval=0, checkpoint_interval=2, sample_tokens=0,
                    peak_flops=1e12, progress=False)
    settings.update(extra)
    return ["pretrain", "--config", "shakespeare-gpt", *(f"{k}={v}" for k, v in settings.items())]


def test_resume_refuses_a_changed_run_and_says_what_safe_change_it_makes(shards, tmp_path, capsys):
    assert cli.main(_pretrain(shards, tmp_path)) == 0
    config_file = tmp_path / "run" / "config.yaml"
    before = config_file.read_text()
    assert cli.main(_pretrain(shards, tmp_path, seq_len=16, batch_size=2) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume refused" in err and "seq_len 32 -> 16" in err and "batch_size 4 -> 2" in err
    assert "name=NEW_NAME" in err
    assert config_file.read_text() == before                      # nothing rewritten
    assert cli.main(_pretrain(shards, tmp_path, max_steps=3) + ["--resume"]) == 0
    assert "resuming with max_steps 2 -> 3" in capsys.readouterr().err
    assert yaml.safe_load(config_file.read_text())["max_steps"] == 3   # written once the resume succeeded


def test_a_failed_resume_leaves_config_yaml_as_it_was(shards, tmp_path, capsys):
    assert cli.main(_pretrain(shards, tmp_path)) == 0
    config_file = tmp_path / "run" / "config.yaml"
    before = config_file.read_text()
    (latest_checkpoint(tmp_path / "run") / "model.safetensors").write_bytes(b"not safetensors")
    assert cli.main(_pretrain(shards, tmp_path, max_steps=4) + ["--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert config_file.read_text() == before


def test_resume_cleans_the_temporary_files_of_a_killed_export(shards, tmp_path):
    assert cli.main(_pretrain(shards, tmp_path)) == 0
    run = tmp_path / "run"
    leftover = run / ".model.safetensors.k2j4h1.tmp"            # what atomic_path leaves when killed
    leftover.write_bytes(b"\0" * 1024)
    (run / "checkpoints" / ".tmp-step-000004-x").mkdir()
    assert cli.main(_pretrain(shards, tmp_path, max_steps=4) + ["--resume"]) == 0
    assert not leftover.exists() and not list((run / "checkpoints").glob(".tmp-*"))
    assert json.loads((run / "checkpoints" / "step-000004" / "checkpoint.json").read_text())["step"] == 4
