"""`RunSession`: the set-up every training command shares around the one Trainer.

    with RunSession(config, resume) as session:          # distributed init ... shutdown
        ...check the inputs (nothing is written yet)...
        resume_from, config_dict, tracker, progress = session.open_run(config, tokenizer)
        # = claim runs/<name>, find the checkpoint to resume, config.yaml + tokenizer (rank 0), tracking
        result = session.fit(trainer, resume_from)

It owns what pretrain, sft and every later command would otherwise each repeat: run-directory
ownership (a run directory this invocation created is removed again when set-up fails, so
`lmforge runs list` never shows a half-made run; an existing run's files are never removed), the
resume rules, the tracker and progress bar, and distributed init and shutdown.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from ..config import save_config, to_dict
from ..errors import UserError
from ..io import ensure_writable_dir
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistributedContext, init_distributed, shutdown_distributed


class RunSession:
    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config, self.resume = config, resume
        self.run_dir: Path = config.run_dir
        self.context: DistributedContext | None = None
        self.tracker: Any = None
        self.progress: Any = None
        self.resume_from: Path | None = None
        self._pending_config: Any = None
        self._created_run_dir = False   # this invocation made run_dir (it then owns it)
        self._training = False          # set-up is over: from here on the run's files are kept

    def __enter__(self) -> "RunSession":
        self.context = init_distributed(self.config.device)
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        remove = error is not None and self._created_run_dir and not self._training
        if self.progress is not None:
            self.progress.close()
        if self.tracker is not None:
            self.tracker.close()
        shutdown_distributed(self.context)
        if remove:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def with_precision(self, config: Any) -> Any:
        """config with precision=auto resolved for this device, refused if the device cannot train in it."""
        import dataclasses

        from .loop import check_precision
        from .throughput import resolve_precision

        config = dataclasses.replace(config, precision=resolve_precision(config.precision, self.context.device))
        check_precision(config, self.context)
        return config

    @property
    def is_main(self) -> bool:
        return self.context.is_main

    def claim_run_dir(self) -> None:
        """Create (or reuse) the run directory; only rank 0 writes."""
        if self.is_main:
            self._created_run_dir = not self.run_dir.exists()
            ensure_writable_dir(self.run_dir, option="out_dir=PATH (or name=NAME)")

    def checkpoint_to_resume(self, config: Any = None) -> Path | None:
        """The latest checkpoint with --resume; without it, a run that has checkpoints is refused.

        With `config`, a resume is checked against the config the checkpoint was saved with: a
        change that would alter the run (the model, the data, batch or sequence size, the
        optimizer) is refused, naming the keys; a safe one (limits, intervals, logging) is said.
        """
        latest = ckpt.latest_checkpoint(self.run_dir)
        if self.resume:
            if latest is None and self.is_main:
                print(f"no checkpoint in '{self.run_dir}' yet: starting the run from step 0", file=sys.stderr)
            if latest is not None and config is not None:
                check_resume_config(latest, to_dict(config), announce=self.is_main)
            self.resume_from = latest
            return latest
        if latest is not None:
            raise UserError(f"run directory '{self.run_dir}' already has checkpoints; continue it with --resume, "
                            "or start a new run with name=NEW_NAME")
        return None

    def open_run(self, config: Any, tokenizer: Any = None) -> tuple[Path | None, dict[str, Any], Any, Any]:
        """Everything after the inputs are checked, in order: claim the run directory, find the
        checkpoint to resume, save config.yaml and the tokenizer (rank 0), start tracking.
        Returns (resume_from, config_dict, tracker, progress)."""
        self.claim_run_dir()
        resume_from = self.checkpoint_to_resume(config)
        config_dict = to_dict(config)
        self.save_config(config)
        if tokenizer is not None and self.is_main:
            tokenizer.save(self.run_dir / "tokenizer")
        tracker, progress = self.start_tracking(config_dict, resume_from)
        return resume_from, config_dict, tracker, progress

    def save_config(self, config: Any) -> None:
        """config.yaml (rank 0). On a resume it is written only once the checkpoint has been restored,
        so a resume that fails leaves the run's config as it was."""
        if not self.is_main:
            return
        if self.resume_from is None:
            save_config(config, self.run_dir / "config.yaml")
        else:
            self._pending_config = config

    def start_tracking(self, config_dict: dict[str, Any], resume_from: Path | None) -> tuple[Any, Any]:
        """The run's tracker (metrics.jsonl, TensorBoard, W&B) and progress bar."""
        from ..track import Tracker
        from ..track.progress import TrainProgress

        config = self.config
        start_step = ckpt.load_trainer_state(resume_from)["step"] if resume_from is not None else 0
        self.tracker = Tracker(self.run_dir, config_dict, tensorboard=config.tensorboard, wandb=config.wandb,
                               wandb_project=config.wandb_project, is_main=self.is_main,
                               resume_step=start_step if self.resume else None)
        self.progress = TrainProgress(total_steps=config.max_steps,
                                      budget_s=config.max_minutes * 60 if config.max_minutes else None,
                                      start_step=start_step, every=max(1, config.log_interval),
                                      enabled=self.is_main and config.progress)
        return self.tracker, self.progress

    def fit(self, trainer: Any, resume_from: Path | None) -> Any:
        """Train; from here on a failure keeps the run directory (it holds logs and checkpoints)."""
        self._training = True
        trainer.hooks.append(self)        # on_train_start: the deferred config.yaml of a resume
        result = trainer.fit(resume_from=resume_from)
        if self.progress is not None:
            self.progress.close()
        return result

    def on_train_start(self, trainer: Any) -> None:
        if self._pending_config is not None:
            save_config(self._pending_config, self.run_dir / "config.yaml")
            self._pending_config = None


# Keys a resume may change: when and how much to train, evaluate, log and keep. Anything else
# (model, data, batch and sequence sizes, optimizer, schedule, precision, seed) would make the
# resumed run a different run, so --resume refuses it.
SAFE_TO_CHANGE = frozenset({
    "max_steps", "max_minutes", "log_interval", "eval_interval", "eval_batches", "eval_at_start",
    "checkpoint_interval", "keep_last", "progress", "tensorboard", "wandb", "wandb_project", "peak_flops",
    "device", "out_dir", "compile", "activation_checkpointing", "trim_host_memory", "sample_interval",
    "sample_prompt",
    "sample_tokens", "temperature", "top_k", "eval_prompts", "answer_tokens", "sample_count",
})


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(checkpoint: Path, config: dict[str, Any], announce: bool = True) -> list[str]:
    """Compare a resume's config with the checkpoint's config.yaml; returns the changed safe keys."""
    import yaml

    saved_file = checkpoint / "config.yaml"
    if not saved_file.is_file():
        return []
    try:
        saved = _flatten(yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as error:
        raise UserError(f"checkpoint config '{saved_file}' is unreadable ({error}); resume from another "
                        "checkpoint or start a new run with name=NEW_NAME") from None
    new = _flatten(config)
    changed = sorted(key for key in set(saved) | set(new) if saved.get(key) != new.get(key))
    refused = [key for key in changed if key.split(".")[0] not in SAFE_TO_CHANGE]
    if refused:
        described = ", ".join(f"{key} {saved.get(key)!r} -> {new.get(key)!r}" for key in refused[:6])
        raise UserError(f"--resume refused: {described} differ from the checkpoint '{checkpoint.name}', which would "
                        "make it a different run; resume with the run's own settings, or start a new run with "
                        "name=NEW_NAME")
    if changed and announce:
        print("resuming with " + ", ".join(f"{key} {saved.get(key)!r} -> {new.get(key)!r}" for key in changed),
              file=sys.stderr)
    return changed
