"""Tracker: metrics.jsonl content, resume truncation, ranks, TensorBoard and W&B sinks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lmforge.errors import UserError
from lmforge.track.tracker import (METRICS_FILE, SAMPLES_FILE, WANDB_ID_FILE, Tracker, read_jsonl,
                                   truncate_logs, wandb_api_key_configured, wandb_mode)


def _rows(run_dir: Path, name: str = METRICS_FILE) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def test_log_writes_one_json_row_per_call(tmp_path):
    run = tmp_path / "run"
    tracker = Tracker(run, {"lr": 1e-3})
    tracker.log(1, {"loss": 4.5, "lr": 1e-3, "tokens_seen": 512})
    tracker.log(2, {"loss": torch.tensor(4.25), "grad_norm": float("nan")})
    # Readable before close: a killed run keeps every row it logged.
    rows = _rows(run)
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["loss"] == 4.5 and rows[0]["tokens_seen"] == 512 and isinstance(rows[0]["tokens_seen"], int)
    assert rows[1]["loss"] == 4.25
    assert rows[1]["grad_norm"] is None  # NaN is not valid JSON; null keeps the line parseable
    assert all(isinstance(row["time"], float) and row["time"] > 1e9 for row in rows)
    tracker.log_text(2, "sample", "To be, or not to be")
    samples = _rows(run, SAMPLES_FILE)
    assert samples == [{"step": 2, "time": samples[0]["time"], "name": "sample", "text": "To be, or not to be"}]
    tracker.close()
    tracker.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tracker.log(3, {"loss": 1.0})


def test_reserved_and_non_numeric_metrics_are_rejected(tmp_path):
    with Tracker(tmp_path, {}) as tracker:
        with pytest.raises(ValueError, match="reserved"):
            tracker.log(1, {"step": 3})
        with pytest.raises(TypeError, match="'loss'"):
            tracker.log(1, {"loss": "low"})


def test_resume_truncates_later_rows_and_appends(tmp_path):
    with Tracker(tmp_path, {}) as tracker:
        for step in range(1, 6):
            tracker.log(step, {"loss": 10.0 - step})
            tracker.log_text(step, "sample", f"text {step}")
    # The checkpoint was saved at step 3; steps 4-5 are redone after the resume.
    with Tracker(tmp_path, {}, resume_step=3) as tracker:
        assert [row["step"] for row in _rows(tmp_path)] == [1, 2, 3]
        assert [row["step"] for row in _rows(tmp_path, SAMPLES_FILE)] == [1, 2, 3]
        tracker.log(4, {"loss": 0.5})
    rows = _rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == 0.5 and rows[2]["loss"] == 7.0


def test_fresh_run_refuses_to_mix_with_existing_logs(tmp_path):
    with Tracker(tmp_path, {}) as tracker:
        tracker.log(1, {"loss": 1.0})
    with pytest.raises(UserError, match="already has logged metrics"):
        Tracker(tmp_path, {})
    with Tracker(tmp_path, {}, overwrite=True) as tracker:
        tracker.log(7, {"loss": 2.0})
    assert [row["step"] for row in _rows(tmp_path)] == [7]


def test_partial_last_line_from_a_killed_run_is_skipped(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    assert [row["step"] for row in read_jsonl(path)] == [1, 2]
    assert truncate_logs(tmp_path, 1) == 1
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'


def test_non_main_rank_writes_nothing(tmp_path):
    run = tmp_path / "rank1"
    tracker = Tracker(run, {}, tensorboard=True, wandb=True, is_main=False)
    tracker.log(1, {"loss": 1.0})
    tracker.log_text(1, "sample", "hi")
    tracker.close()
    assert not run.exists()


def test_tensorboard_scalars_and_text_can_be_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Tracker(tmp_path, {"lr": 1e-3}, tensorboard=True) as tracker:
        for step in (1, 2, 3):
            tracker.log(step, {"loss": 5.0 - step, "lr": 1e-3})
        tracker.log_text(3, "sample", "To be")
    # Resume from step 2: TensorBoard must hide the step-3 value of the crashed session.
    with Tracker(tmp_path, {"lr": 1e-3}, tensorboard=True, resume_step=2) as tracker:
        tracker.log(3, {"loss": 0.25})
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    loss = [(event.step, event.value) for event in events.Scalars("loss")]
    assert loss == [(1, 4.0), (2, 3.0), (3, 0.25)]
    assert [event.step for event in events.Scalars("lr")] == [1, 2]  # step 3 was purged, not re-logged
    assert "config/text_summary" in events.Tags()["tensors"]


def test_missing_sink_package_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(UserError, match="TensorBoard logging was requested"):
        Tracker(tmp_path / "a", {}, tensorboard=True)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="Weights & Biases logging was requested"):
        Tracker(tmp_path / "b", {}, wandb=True)


def _isolate_wandb(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def test_wandb_defaults_to_offline_without_an_api_key(tmp_path, monkeypatch):
    _isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_api_key_configured() and wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_api_key_configured() and wandb_mode() is None
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit mode always wins
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode() is None


@pytest.mark.slow
def test_wandb_offline_run_folder_and_resume_keeps_the_run_id(tmp_path, monkeypatch):
    _isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    with Tracker(run, {"lr": 1e-3}, wandb=True, wandb_project="lmforge-test") as tracker:
        tracker.log(1, {"loss": 3.0})
        tracker.log_text(1, "sample", "hello")
    run_id = (run / WANDB_ID_FILE).read_text()
    folders = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1 and list(folders[0].glob(f"run-{run_id}.wandb"))
    with Tracker(run, {"lr": 1e-3}, wandb=True, resume_step=1) as tracker:
        tracker.log(2, {"loss": 2.5})
    # The resumed session logged to the same W&B run id (a new run would get a random one). Two
    # sessions started within one second share a folder name and wandb appends "-1" to the second,
    # so the check is on the run id inside the folder name, not on how the name ends.
    assert (run / WANDB_ID_FILE).read_text() == run_id
    latest = (run / "wandb" / "latest-run").resolve().name
    assert f"-{run_id}" in latest and latest.startswith("offline-run-")
    assert {path.name for path in (run / "wandb").glob(f"offline-run-*-{run_id}*")} >= {folders[0].name, latest}
