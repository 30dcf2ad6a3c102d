"""`lmforge pretrain` end to end on real Shakespeare shards: GPT and BERT, the run directory,
resume after a SIGKILL, torchrun, and the user errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from lmforge import cli
from lmforge.config import REPO_CONFIG_DIR
from lmforge.errors import UserError
from lmforge.track.tracker import read_jsonl
from lmforge.train import load_pretrain_config, pretrain
from lmforge.train.checkpoint import list_checkpoints

from train_support import make_shakespeare_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, str]:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "train-shakespeare")


def _tiny(shards: tuple[str, str], out_dir: Path, name: str, **extra) -> list[str]:
    settings = dict(data=shards[0], out_dir=out_dir, name=name, preset="nano", seq_len=64, batch_size=8,
                    max_steps=30, lr=3e-3, warmup_steps=5, log_interval=5, eval_interval=15, eval_batches=4,
                    checkpoint_interval=15, sample_interval=15, sample_tokens=12, peak_flops=1e12, progress=False)
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def test_gpt_pretraining_run_directory_and_loss_falls(shards, tmp_path):
    result = pretrain(load_pretrain_config("shakespeare-gpt", _tiny(shards, tmp_path, "gpt")))
    run = tmp_path / "gpt"
    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train_rows] == [1, 5, 10, 15, 20, 25, 30]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.6
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb"):
        assert isinstance(train_rows[-1][key], float), key
    final = result.eval_metrics
    assert final["val_loss"] < train_rows[0]["loss"] - 0.6
    assert final["val_ppl"] == pytest.approx(torch.tensor(final["val_loss"]).exp().item())
    meta = json.loads(Path(shards[0], "meta.json").read_text())
    bytes_per_token = meta["val"]["bytes"] / meta["val"]["tokens"]
    assert final["val_bpb"] == pytest.approx(final["val_loss"] / torch.log(torch.tensor(2.0)).item() / bytes_per_token)
    samples = read_jsonl(run / "samples.jsonl")
    assert [row["step"] for row in samples] == [15, 30] and samples[0]["text"].startswith("ROMEO:")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 512 and saved["model"]["max_seq_len"] == 64 and saved["preset"] == "nano"
    assert [step for step, _ in list_checkpoints(run)] == [15, 30]
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "best.json").is_file()

    # The run loads back as a model (lmforge.load picks the best checkpoint).
    from lmforge import load

    model, tokenizer = load(str(run))
    assert tokenizer.vocab_size == 512
    ids = torch.tensor([tokenizer.encode("ROMEO: What")])
    assert model(ids).shape == (1, ids.shape[1], 512)


def test_bert_pretraining_from_the_command_line(shards, tmp_path, capsys):
    code = cli.main(["pretrain", "--config", "shakespeare-bert",
                     *_tiny(shards, tmp_path, "bert", preset="bert-nano", max_steps=10, eval_interval=10,
                            checkpoint_interval=10, lr=1e-3, warmup_steps=2)])
    assert code == 0
    rows = read_jsonl(tmp_path / "bert" / "metrics.jsonl")
    assert {"val_loss", "val_ppl", "val_mlm_accuracy"} <= set(rows[-1])
    assert "val_bpb" not in rows[-1]                    # a masked LM does not model the whole text
    assert "mlm_accuracy" in rows[0] and not read_jsonl(tmp_path / "bert" / "samples.jsonl")
    assert "done: 10 steps" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_loss_curve(shards, tmp_path):
    """A CLI run is SIGKILLed after its first checkpoint and continued with --resume. fp32 on CPU,
    same seed: every logged loss equals an uninterrupted run's, bit for bit."""
    args = _tiny(shards, tmp_path, "run", max_steps=24, log_interval=1, eval_interval=0, checkpoint_interval=4,
                 sample_interval=0, sample_tokens=0, keep_last=1)
    command = [sys.executable, "-m", "lmforge", "pretrain", "--config", "shakespeare-gpt", *args, "name=killed"]
    killed = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Meanwhile the uninterrupted run, in this process (a thread, so that the kill is not delayed).
    codes = []

    def run_uninterrupted() -> None:
        torch.set_num_threads(1)       # as OMP_NUM_THREADS=1 in the other process: the same kernels
        codes.append(cli.main(["pretrain", "--config", "shakespeare-gpt", *args, "name=uninterrupted"]))

    uninterrupted = threading.Thread(target=run_uninterrupted)
    uninterrupted.start()
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(tmp_path / "killed") and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    finally:
        if killed.poll() is None:
            killed.kill()
        uninterrupted.join()
    assert codes == [0]
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read().decode()
    kept = [step for step, _ in list_checkpoints(tmp_path / "killed")]
    assert kept and max(kept) < 24                      # killed midway, after a checkpoint

    assert cli.main(["pretrain", "--config", "shakespeare-gpt", *args, "name=killed", "--resume"]) == 0
    expected = {row["step"]: row["loss"] for row in read_jsonl(tmp_path / "uninterrupted" / "metrics.jsonl")}
    resumed = {row["step"]: row["loss"] for row in read_jsonl(tmp_path / "killed" / "metrics.jsonl")}
    assert sorted(resumed) == sorted(expected) == list(range(1, 25))
    assert resumed == expected


def test_unwritable_output_directory_is_a_clear_error(shards, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = cli.main(["pretrain", "--config", "shakespeare-gpt", *_tiny(shards, blocker, "x")])
    assert code == 2
    error = capsys.readouterr().err
    assert "cannot write to output directory" in error and "out_dir=" in error


def test_config_errors_list_the_valid_keys(capsys):
    assert cli.main(["pretrain", "--config", "shakespeare-gpt", "lerning_rate=1"]) == 2
    error = capsys.readouterr().err
    assert "unknown config key 'lerning_rate'" in error and "valid keys are:" in error
    assert "warmup_steps" in error and "model.n_layers" in error
    with pytest.raises(UserError, match="unknown config key 'model.layers'.*model.n_layers"):
        load_pretrain_config("shakespeare-gpt", ["model.layers=3"])
    with pytest.raises(UserError, match="schedule must be one of"):
        load_pretrain_config("shakespeare-gpt", ["schedule=linear"])
    with pytest.raises(UserError, match="unknown model preset"):
        load_pretrain_config(None, ["preset=huge"])


def test_recipes_resolve_and_model_overrides_rederive_sizes():
    for recipe in ("shakespeare-gpt", "shakespeare-bert", "gpt2-124m"):
        assert (REPO_CONFIG_DIR / f"{recipe}.yaml").is_file()
        load_pretrain_config(recipe)
    gpt2 = load_pretrain_config("gpt2-124m")
    assert (gpt2.model.d_model, gpt2.model.n_layers, gpt2.model.max_seq_len, gpt2.precision) == (768, 12, 1024, "bf16")
    # Changing d_model re-derives d_ff and head_dim (unless they are given too).
    wider = load_pretrain_config("shakespeare-gpt", ["model.d_model=256", "model.n_layers=2"])
    assert (wider.model.d_ff, wider.model.head_dim, wider.model.n_layers, wider.model.n_kv_heads) == (704, 64, 2, 2)
    assert load_pretrain_config("shakespeare-gpt", ["model.d_ff=100"]).model.d_ff == 100
    assert load_pretrain_config("shakespeare-gpt", ["seq_len=128"]).model.max_seq_len == 128
    with pytest.raises(UserError, match="longer than model.max_seq_len"):
        load_pretrain_config("shakespeare-gpt", ["seq_len=512", "model.max_seq_len=256"])


def test_existing_run_needs_resume(shards, tmp_path):
    args = _tiny(shards, tmp_path, "twice", max_steps=2, checkpoint_interval=2, eval_interval=0, sample_tokens=0)
    pretrain(load_pretrain_config("shakespeare-gpt", args))
    with pytest.raises(UserError, match="--resume"):
        pretrain(load_pretrain_config("shakespeare-gpt", args))
    # Resuming a finished run with a higher step limit continues it.
    result = pretrain(load_pretrain_config("shakespeare-gpt", args + ["max_steps=3"]), resume=True)
    assert result.step == 3


@pytest.mark.parametrize("bad", [dict(precision="fp16", device="cpu"), dict(data="nope"), dict(tokenizer="nope")])
def test_failed_validation_leaves_no_run_directory(shards, tmp_path, capsys, bad):
    code = cli.main(["pretrain", "--config", "shakespeare-gpt", *_tiny(shards, tmp_path, "bad", **bad)])
    assert code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()      # `lmforge runs list` would show it


def test_a_setup_failure_removes_only_a_run_directory_it_created(shards, tmp_path, monkeypatch):
    import lmforge.track

    def broken_tracker(*args, **kwargs):
        raise UserError("the tracker cannot start")

    monkeypatch.setattr(lmforge.track, "Tracker", broken_tracker)
    args = _tiny(shards, tmp_path, "new", max_steps=1, sample_tokens=0)
    with pytest.raises(UserError, match="tracker cannot start"):
        pretrain(load_pretrain_config("shakespeare-gpt", args))
    assert not (tmp_path / "new").exists()       # config.yaml and tokenizer/ were written, then removed

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="tracker cannot start"):
        pretrain(load_pretrain_config("shakespeare-gpt", _tiny(shards, tmp_path, "existing", max_steps=1)))
    assert (existing / "notes.txt").read_text() == "keep me"
