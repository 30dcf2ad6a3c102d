"""`RunSession`: the set-up every training command shares around the one Trainer.

    with RunSession(config, resume) as session:          # distributed init ... shutdown
        ...check the inputs (nothing is written yet)...
        session.claim_run_dir()                            # create or reuse runs/<name>
        resume_from = session.checkpoint_to_resume()
        session.save_config(config)                        # config.yaml (rank 0)
        tracker, progress = session.start_tracking(config_dict, resume_from)
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

from ..config import save_config
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

    @property
    def is_main(self) -> bool:
        return self.context.is_main

    def claim_run_dir(self) -> None:
        """Create (or reuse) the run directory; only rank 0 writes."""
        if self.is_main:
            self._created_run_dir = not self.run_dir.exists()
            ensure_writable_dir(self.run_dir, option="out_dir=PATH (or name=NAME)")

    def checkpoint_to_resume(self) -> Path | None:
        """The latest checkpoint with --resume; without it, a run that has checkpoints is refused."""
        latest = ckpt.latest_checkpoint(self.run_dir)
        if self.resume:
            if latest is None and self.is_main:
                print(f"no checkpoint in '{self.run_dir}' yet: starting the run from step 0", file=sys.stderr)
            return latest
        if latest is not None:
            raise UserError(f"run directory '{self.run_dir}' already has checkpoints; continue it with --resume, "
                            "or start a new run with name=NEW_NAME")
        return None

    def save_config(self, config: Any) -> None:
        if self.is_main:
            save_config(config, self.run_dir / "config.yaml")

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
        result = trainer.fit(resume_from=resume_from)
        if self.progress is not None:
            self.progress.close()
        return result
