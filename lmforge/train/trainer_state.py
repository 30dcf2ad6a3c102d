"""Saving, restoring and exporting a Trainer's state (the loop itself is in loop.py).

A checkpoint holds everything needed to continue a run exactly: the model, the optimizer (keyed by
the model and the objective's extra modules), the GradScaler, the EMA, the objective's own state
(e.g. a KL controller), the step and token counts, every process's RNG and data-loader state.
The files and their atomic writing are checkpoint.py's; this module decides what goes in them.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import UserError
from ..model.builders import tied_names
from . import checkpoint as ckpt
from .distributed import full_tensor

if TYPE_CHECKING:
    from .loop import Trainer


def save_checkpoint(trainer: "Trainer", val_loss: float | None, train_loss: float | None) -> Path:
    """Save a checkpoint of the current step (every process must call it); returns its path."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    path = trainer.run_dir / ckpt.CHECKPOINTS / ckpt.step_dir_name(trainer.step)
    if trainer._saved_step == trainer.step:
        return path

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # A frozen base (LoRA) is the same at every step: when checkpoint_config names it
    # ("base_model"), checkpoints hold the trained tensors only and lmforge.load rebuilds the rest.
    # Other frozen weights (a partly frozen model) stay in the checkpoint, which then loads alone.
    frozen = frozen_names(trainer.raw) if "base_model" in (trainer.checkpoint_config or {}) else set()
    model_state = {k: v for k, v in get_model_state_dict(trainer.raw, options=full).items() if k not in frozen}
    optimizer_state = get_optimizer_state_dict(trainer._optimized, trainer.optimizer, options=full)
    ema_state = ({name: full_tensor(t).cpu() for name, t in trainer.ema.state_dict().items()}
                 if trainer.ema is not None else None)
    rng_states = trainer.context.gather_objects(rng_state())
    loader_states = trainer.context.gather_objects(trainer.batches.state_dict())
    # This step's own validation counts before the state is written: a checkpoint that stored the
    # best loss of the steps before it would, once resumed, let a worse checkpoint become "best"
    # and the true best be pruned.
    is_best = val_loss is not None and (trainer.best_val_loss is None or val_loss < trainer.best_val_loss)
    if is_best:
        trainer.best_val_loss = val_loss
    if trainer.context.is_main:
        aliases = tied_names(trainer.raw)
        state = {
            "step": trainer.step, "tokens": trainer.tokens, "elapsed_seconds": trainer.elapsed_seconds,
            "optimizer": optimizer_state, "scaler": trainer.scaler.state_dict(),
            "schedule": trainer.schedule.state_dict(), "ema_updates": trainer.ema.updates if trainer.ema else 0,
            "rng": rng_states, "loader": loader_states, "world_size": trainer.context.world_size,
            "best_val_loss": trainer.best_val_loss, "objective": trainer.objective.state_dict(),
        }
        summary = {"val_loss": val_loss, "train_loss": train_loss, "tokens_seen": trainer.tokens}
        path = ckpt.save_checkpoint(
            trainer.run_dir, trainer.step, {k: v for k, v in model_state.items() if k not in aliases},
            state, trainer.config_dict, extras_state=trainer.extras.state_dict() if len(trainer.extras) else None,
            ema_state={k: v for k, v in ema_state.items() if k not in aliases} if ema_state else None,
            model_config=trainer.checkpoint_config, summary=summary)
        if is_best:
            ckpt.record_best(trainer.run_dir, trainer.step, val_loss)
        ckpt.prune_checkpoints(trainer.run_dir, trainer.config.keep_last)
    trainer.best_val_loss = trainer.context.gather_objects(trainer.best_val_loss)[0]
    trainer._saved_step = trainer.step
    return path

def load_checkpoint(trainer: "Trainer", path: str | Path) -> None:
    """Restore weights, optimizer, scaler, EMA, step, RNG and data position from a checkpoint."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    state = ckpt.load_trainer_state(path)
    if state["world_size"] != trainer.context.world_size:
        raise UserError(f"checkpoint '{path}' was saved by {state['world_size']} processes, but this run has "
                        f"{trainer.context.world_size}; resume with the same number of processes")
    full = StateDictOptions(full_state_dict=True, strict=False)
    weights = ckpt.load_tensors(path / "model.safetensors")
    incompatible = set_model_state_dict(trainer.raw, weights, options=full)
    missing = set(incompatible.missing_keys) - tied_names(trainer.raw)
    if "base_model" in (trainer.checkpoint_config or {}):
        missing -= frozen_names(trainer.raw)      # the base comes from base_model, not the checkpoint
    if missing or incompatible.unexpected_keys:
        raise UserError(f"checkpoint '{path}' does not fit this model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(incompatible.unexpected_keys)[:3]}); use the run's own config")
    set_optimizer_state_dict(trainer._optimized, trainer.optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    trainer.scaler.load_state_dict(state["scaler"])
    if trainer.ema is not None:
        ema_file = path / "ema.safetensors"
        ema_weights = ckpt.load_tensors(ema_file) if ema_file.is_file() else weights
        trainer.ema.load_state_dict(shard_like(ema_weights, trainer.ema.shadow), state["ema_updates"])
    trainer.step, trainer.tokens = state["step"], state["tokens"]
    trainer.elapsed_before = state["elapsed_seconds"]
    trainer.best_val_loss = state["best_val_loss"]
    trainer.batches.load_state_dict(state["loader"][trainer.context.rank])
    trainer.objective.load_state_dict(state.get("objective") or {})
    if len(trainer.extras):
        trainer.extras.load_state_dict(shard_like(ckpt.load_tensors(path / ckpt.EXTRAS_FILE), trainer.extras.state_dict()))
    set_rng_state(state["rng"][trainer.context.rank])
    trainer._horizon = trainer.config.max_steps or max(trainer.step + 1, trainer.config.warmup_steps)
    trainer._saved_step = trainer.step

def export_model(trainer: "Trainer", directory: str | Path) -> None:
    """Write the weights evaluation uses (EMA if on) as model.safetensors + config.json."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    ema = trainer.ema.applied(trainer.raw) if trainer.ema is not None else contextlib.nullcontext()
    with ema:
        if trainer.export_state is not None:
            weights = trainer.export_state(trainer.raw)
        else:
            weights = get_model_state_dict(trainer.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # The EMA's swap-back would change tensors that share the parameters' storage: copy them
        # then. Without an EMA the tensors are saved as they are (a clone would double the export).
        if trainer.ema is not None:
            weights = {name: tensor.clone() for name, tensor in weights.items()}
    if trainer.context.is_main:
        aliases = tied_names(trainer.raw)
        ckpt.export_model(directory, {k: v for k, v in weights.items() if k not in aliases}, trainer.model_config)
    trainer.context.barrier()


def frozen_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that are not trained (a LoRA base)."""
    return {name for name, param in model.named_parameters() if not param.requires_grad}


def shard_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors laid out like `like` (sharded DTensors under FSDP, plain tensors otherwise)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for name, reference in like.items():
        if isinstance(reference, DTensor):
            out[name] = distribute_tensor(full[name].to(reference.device_mesh.device_type),
                                          reference.device_mesh, reference.placements)
        else:
            out[name] = full[name].to(reference.device)
    return out


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's key array becomes a list, so the state loads with weights_only=True.
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a round trip through a checkpoint may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
