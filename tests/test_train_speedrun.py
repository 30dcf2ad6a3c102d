"""`lmforge speedrun` (what `make demo` runs) end to end on a tiny budget: the tokenizer, the shards,
the time-budgeted training, and the report, for the GPT and the BERT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import load
from lmforge.train.speedrun import SpeedrunConfig, speedrun

pytestmark = pytest.mark.slow
BUDGET = ["--minutes", "0.1", "--vocab-size", "512"]
FAST_EVAL = ["eval_batches=2", "sample_tokens=16"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speedrun-artifacts")


def test_speedrun_from_the_command_line_writes_a_complete_report(tmp_path, artifacts):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "lmforge", "speedrun", *BUDGET, "--name", "gpt", "--out-dir", str(tmp_path),
         "--artifacts", str(artifacts), *FAST_EVAL],
        capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr
    run = tmp_path / "gpt"
    for step in ("[1/4] tokenizer", "[2/4] data", "[3/4] pretrain", "[4/4] evaluate"):
        assert step in completed.stderr
    assert completed.stderr.rstrip().endswith(f"report: {run / 'report.md'}")

    report = json.loads((run / "report.json").read_text())
    assert (report["objective"], report["recipe"], report["preset"]) == ("clm", "modern", "tiny")
    assert report["stop_reason"] == "time_budget" and report["steps"] > 0
    assert report["tokens_seen"] == report["steps"] * 8 * 256          # speedrun-gpt: batch 8 x 256 tokens
    # Better than a uniform guess over the 512 tokens (9 bits per token).
    val = json.loads((artifacts / "shakespeare-512" / "meta.json").read_text())["val"]
    assert 0 < report["val_bpb"] < 9 * val["tokens"] / val["bytes"]
    model, tokenizer = load(run)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert [sample["prompt"] for sample in report["samples"]] == ["ROMEO:", "KING HENRY:\nWhat", "To be, or not to be"]
    assert all(sample["text"].startswith(sample["prompt"]) for sample in report["samples"])
    markdown = (run / "report.md").read_text()
    assert f"| val_bpb | {report['val_bpb']:.4f} |" in markdown and "curves.png" in markdown and "ROMEO:" in markdown
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tokenizer.vocab_size == 512 and model.config.arch == "gpt"


def test_speedrun_of_a_bert_reports_masked_token_accuracy(tmp_path, artifacts):
    result = speedrun(SpeedrunConfig(minutes=0.1, objective="mlm", vocab_size=512, name="bert", out_dir=str(tmp_path),
                                     artifacts=str(artifacts), overrides=FAST_EVAL))
    figures = json.loads((result.run_dir / "report.json").read_text())
    assert figures["objective"] == "mlm" and figures["preset"] == "bert-tiny"
    assert 0 <= figures["val_mlm_accuracy"] <= 1 and figures["val_loss"] > 0
    assert f"| val_mlm_accuracy | {figures['val_mlm_accuracy']:.4f} |" in result.report.read_text()
    assert result.run_dir.name == "bert"
