"""Checkpoints: everything needed to continue a run exactly, written atomically.

    runs/<name>/checkpoints/step-000100/
        model.safetensors     the weights (a tied output head is stored once, as the embedding)
        ema.safetensors       the EMA weights, when EMA is on
        extras.safetensors    the objective's extra trained modules (a value head), if any
        trainer_state.pt      optimizer, GradScaler, schedule, step, RNG states and data-loader
                              states of every process (tensors and plain containers only, so it
                              loads with torch.load(weights_only=True))
        config.yaml           the run's resolved config
        config.json           the ModelConfig (with model.safetensors, what `lmforge.load` reads)
        checkpoint.json       step and losses, for people and `lmforge runs`
    runs/<name>/best.json     the step and validation loss of the best checkpoint

A checkpoint is written into a hidden temporary directory and renamed to `step-NNNNNN` once every
file is on disk. A rename is atomic, so a kill during a save leaves at most a stray temporary
directory (ignored and cleaned up) and never a half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io import apply_default_modes, atomic_path, write_text_atomic
from ..rundir import (BEST_FILE, CHECKPOINTS, EXTRAS_FILE, latest_checkpoint, list_checkpoints,  # noqa: F401
                      read_best, record_best, step_dir_name)

_TEMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors needs contiguous CPU tensors that do not share memory.
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, str(path),
              metadata={"format": "pt"})


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], config: dict[str, Any],
                    ema_state: dict[str, torch.Tensor] | None = None,
                    model_config: dict[str, Any] | None = None,
                    summary: dict[str, Any] | None = None,
                    extras_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint atomically and return its directory (called on rank 0 only)."""
    directory = Path(run_dir) / CHECKPOINTS
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / step_dir_name(step)
    if final.exists():   # this step was already saved (e.g. the final save at a checkpoint step)
        return final
    temp = Path(tempfile.mkdtemp(dir=directory, prefix=f"{_TEMP_PREFIX}{final.name}-"))
    try:
        _save_tensors(model_state, temp / "model.safetensors")
        if ema_state is not None:
            _save_tensors(ema_state, temp / "ema.safetensors")
        if extras_state is not None:
            _save_tensors(extras_state, temp / EXTRAS_FILE)
        torch.save(trainer_state, temp / "trainer_state.pt")
        (temp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        if model_config is not None:
            (temp / "config.json").write_text(json.dumps(model_config, indent=2) + "\n", encoding="utf-8")
        (temp / "checkpoint.json").write_text(json.dumps({"step": step, **(summary or {})}, indent=2) + "\n",
                                              encoding="utf-8")
        for file in temp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        apply_default_modes(temp)
        _fsync_dir(temp)
        os.rename(temp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def remove_stale_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete what a killed save left behind: temporary checkpoint directories, and the temporary
    files of atomic writes in the run directory (`.model.safetensors.XXXX.tmp`, up to the model's size)."""
    directory = Path(run_dir) / CHECKPOINTS
    if directory.is_dir():
        for path in directory.glob(f"{_TEMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
    for path in Path(run_dir).glob(".*.tmp"):        # lmforge.io.atomic_path's naming
        with contextlib.suppress(OSError):
            path.unlink()


def _corrupt(path: Path, error: BaseException | str) -> UserError:
    """The one message for an unreadable checkpoint file: name it, and say how to fall back."""
    return UserError(f"checkpoint file '{path}' is corrupt or incomplete ({error}); delete the directory "
                     f"'{path.parent}' to resume from an earlier checkpoint")


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    import pickle

    path = Path(checkpoint) / "trainer_state.pt"
    if not path.is_file():
        raise UserError(f"checkpoint '{checkpoint}' has no trainer_state.pt; resume from a complete checkpoint")
    try:
        # weights_only=True: the file holds tensors and plain containers only, never code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError,
            AttributeError, TypeError) as error:
        # A damaged pickle fails inside the unpickler with whatever error its bytes happen to
        # trigger (a KeyError for a bad memo index, EOFError for a truncation, ...).
        raise _corrupt(path, f"{type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise _corrupt(path, "it does not hold a trainer state")
    return state


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise _corrupt(path, error) from None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never the best one. Returns the deleted."""
    best = read_best(run_dir)
    best_step = best["step"] if best else None
    checkpoints = list_checkpoints(run_dir)
    removable = [(step, path) for step, path in checkpoints[:-keep_last] if step != best_step]
    for _, path in removable:
        # Rename first, so a kill mid-delete never leaves a partial `step-*` that looks complete.
        doomed = path.with_name(f"{_TEMP_PREFIX}deleted-{path.name}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return [path for _, path in removable]


def export_model(directory: str | os.PathLike, weights: dict[str, torch.Tensor],
                 model_config: dict[str, Any] | None) -> None:
    """`model.safetensors` + `config.json` in `directory`: the format `lmforge.load` reads."""
    directory = Path(directory)
    with atomic_path(directory / "model.safetensors") as temp:
        _save_tensors(weights, temp)
    if model_config is not None:
        write_text_atomic(directory / "config.json", json.dumps(model_config, indent=2) + "\n")
