"""The run-directory format, with one owner: what training writes and `lmforge.load` reads.

    runs/<name>/checkpoints/step-NNNNNN/    complete checkpoints (see lmforge.train.checkpoint)
    runs/<name>/best.json                   the step and validation loss of the best checkpoint

Training (lmforge.train) writes these and the loader (lmforge.model.loading) finds weights in
them; both import the names from here, so neither layer imports the other for them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .io import read_json, write_json_atomic

CHECKPOINTS = "checkpoints"
BEST_FILE = "best.json"
EXTRAS_FILE = "extras.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of the run, oldest first."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def read_best(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / BEST_FILE
    return read_json(path, "best-checkpoint record") if path.is_file() else None


def record_best(run_dir: str | os.PathLike, step: int, val_loss: float) -> None:
    write_json_atomic(Path(run_dir) / BEST_FILE,
                      {"step": step, "val_loss": val_loss, "checkpoint": f"{CHECKPOINTS}/{step_dir_name(step)}"})
