"""`Tracker`: one place a training run reports its metrics and text samples.

Every run writes `run_dir/metrics.jsonl` (one JSON object per `log` call, flushed at once so a
killed run keeps everything it logged) and `run_dir/samples.jsonl`. TensorBoard and Weights &
Biases are optional extra sinks fed the same values; their packages are imported only when asked
for. Only the main process of a distributed run writes anything (`is_main=False` is a no-op).

    tracker = Tracker("runs/tiny", config, tensorboard=True)
    tracker.log(step, {"loss": 3.2, "lr": 3e-4, "tokens_per_s": 41_000})
    tracker.log_text(step, "sample", "To be, or not to be")
    tracker.close()

A resumed run passes `resume_step` (the step of the checkpoint it loaded): log rows written after
that checkpoint are dropped, because the run is about to redo those steps, so `metrics.jsonl`
stays monotone in `step`.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from ..errors import UserError
from ..io import atomic_open, ensure_writable_dir, write_text_atomic

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
RESERVED_KEYS = ("step", "time")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines log; unreadable lines are skipped.

    A run killed mid-write can leave a partial last line, which must not make the log unreadable.
    """
    rows = []
    file = Path(path)
    if not file.is_file():
        return rows
    with open(file, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):    # JSONDecodeError, an int over 4,300 digits, deep nesting
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def truncate_logs(run_dir: str | os.PathLike, step: int) -> int:
    """Drop rows with `row["step"] > step` from the run's metrics and samples logs.

    Call it when resuming from a checkpoint saved at `step`. Files are rewritten atomically.
    Returns the number of rows dropped.
    """
    dropped = 0
    for name in (METRICS_FILE, SAMPLES_FILE):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        rows = read_jsonl(path)
        kept = [row for row in rows if isinstance(row.get("step"), (int, float)) and row["step"] <= step]
        dropped += len(rows) - len(kept)
        with atomic_open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in kept)
    return dropped


def _number(key: str, value: Any) -> int | float:
    """A metric as a plain Python number (accepts 0-d tensors and numpy scalars)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    raise TypeError(f"metric '{key}' must be a number, got {type(value).__name__}")


def _json_safe(value: int | float) -> int | float | None:
    # NaN/inf are not valid JSON; null keeps every line readable by strict parsers (jq, JS).
    return None if isinstance(value, float) and not math.isfinite(value) else value


def wandb_api_key_configured() -> bool:
    """True if W&B would find an API key: WANDB_API_KEY or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(netrc_path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode() -> str | None:
    """The mode to start W&B in: WANDB_MODE if set (None lets wandb read it), else offline without a key."""
    if os.environ.get("WANDB_MODE"):
        return None
    return None if wandb_api_key_configured() else "offline"


class Tracker:
    """Writes metrics and samples to jsonl, and optionally to TensorBoard and W&B.

    Args:
        run_dir: the run's directory (created if needed).
        config: the run's resolved config, recorded by TensorBoard (as text) and W&B.
        tensorboard: also write TensorBoard event files under `run_dir/tensorboard`.
        wandb: also log to Weights & Biases. Without an API key (and without WANDB_MODE set) the
            run is logged offline under `run_dir/wandb`, to upload later with `wandb sync`.
        wandb_project: W&B project name (default "lmforge").
        is_main: False on non-zero distributed ranks, which then log nothing.
        resume_step: the checkpoint step a resumed run restarts from; later rows are dropped.
        overwrite: a fresh run (no resume_step) may replace logs already in run_dir.
    """

    def __init__(self, run_dir: str | os.PathLike, config: Mapping[str, Any], tensorboard: bool = False,
                 wandb: bool = False, wandb_project: str | None = None, is_main: bool = True,
                 resume_step: int | None = None, overwrite: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = is_main
        self._metrics_file = None
        self._samples_file = None
        self._tensorboard = None
        self._wandb_run = None
        self._wandb_tables: dict[str, list[list[Any]]] = {}
        if not self.enabled:
            return
        ensure_writable_dir(self.run_dir)
        self._prepare_logs(resume_step, overwrite)
        # Line-buffered append: each row reaches the OS as soon as it is written.
        self._metrics_file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8", buffering=1)
        self._samples_file = open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8", buffering=1)
        fresh = resume_step is None
        try:
            if tensorboard:
                self._tensorboard = self._open_tensorboard(config, purge_step=0 if fresh else resume_step + 1)
            if wandb:
                self._wandb_run = self._open_wandb(config, wandb_project or "lmforge", resume=not fresh)
        except BaseException:
            self.close()  # a sink that cannot start must not leave the others open
            raise

    def _prepare_logs(self, resume_step: int | None, overwrite: bool) -> None:
        if resume_step is not None:
            truncate_logs(self.run_dir, resume_step)
            return
        if read_jsonl(self.run_dir / METRICS_FILE) and not overwrite:
            raise UserError(
                f"run directory '{self.run_dir}' already has logged metrics; resume that run "
                "or choose a new run directory"
            )
        truncate_logs(self.run_dir, -1)

    def _open_tensorboard(self, config: Mapping[str, Any], purge_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise UserError(
                f"TensorBoard logging was requested but cannot be imported ({error}); "
                "install it with `pip install tensorboard` or turn TensorBoard logging off"
            ) from None
        # purge_step hides events a crashed run logged after the checkpoint it resumes from.
        writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=10)
        if purge_step == 0:
            config_text = json.dumps(dict(config), indent=2, default=str)
            writer.add_text("config", _markdown_code(config_text), global_step=0)
        return writer

    def _open_wandb(self, config: Mapping[str, Any], project: str, resume: bool):
        try:
            import wandb
        except ImportError as error:
            raise UserError(
                f"Weights & Biases logging was requested but cannot be imported ({error}); "
                "install it with `pip install wandb` or turn W&B logging off"
            ) from None
        mode = wandb_mode()
        if mode == "offline":
            print(f"W&B: no API key configured, logging offline to {self.run_dir / 'wandb'} "
                  "(upload later with `wandb sync`)", file=sys.stderr)
        # A resumed run continues the same W&B run, so its id is kept beside the logs.
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        try:
            run = wandb.init(
                project=project, name=self.run_dir.name, dir=str(self.run_dir), config=dict(config),
                id=run_id, resume="allow" if run_id else None, mode=mode,
                # console="off": W&B would otherwise wrap stderr, under the live progress bar.
                settings=wandb.Settings(console="off"),
            )
        except Exception as error:  # wandb raises many types (network, auth, usage)
            raise UserError(
                f"could not start the W&B run ({error}); set WANDB_MODE=offline to log locally "
                "or turn W&B logging off"
            ) from None
        write_text_atomic(id_file, run.id)
        return run

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one row `{"step", "time", **metrics}` to metrics.jsonl (and the other sinks)."""
        if not self.enabled:
            return
        self._check_open()
        clash = [key for key in RESERVED_KEYS if key in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved by the tracker")
        values = {key: _number(key, value) for key, value in metrics.items()}
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({key: _json_safe(value) for key, value in values.items()})
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, global_step=int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))

    def log_text(self, step: int, name: str, text: str) -> None:
        """Record a text sample (e.g. a generation) under `name` at `step`."""
        if not self.enabled:
            return
        self._check_open()
        row = {"step": int(step), "time": round(time.time(), 3), "name": name, "text": text}
        self._samples_file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._samples_file.flush()
        if self._tensorboard is not None:
            self._tensorboard.add_text(name, _markdown_code(text), global_step=int(step))
        if self._wandb_run is not None:
            import wandb

            # W&B tables are immutable once logged, so the growing table is logged again.
            rows = self._wandb_tables.setdefault(name, [])
            rows.append([int(step), text])
            self._wandb_run.log({name: wandb.Table(columns=["step", "text"], data=list(rows))}, step=int(step))

    def _check_open(self) -> None:
        if self._metrics_file is None:
            raise RuntimeError(f"the tracker for '{self.run_dir}' is closed; log before calling close()")

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        for handle in (self._metrics_file, self._samples_file):
            if handle is not None:
                handle.close()
        self._metrics_file = self._samples_file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _markdown_code(text: str) -> str:
    # TensorBoard renders text as markdown; an indented block keeps whitespace and symbols as-is.
    return "\n".join("    " + line for line in text.splitlines()) or "    "
