"""The training loop: one `Trainer` for every objective.

    trainer = Trainer(model, CausalLMObjective(), train_loader, config, run_dir="runs/x",
                      evaluate=my_eval_fn, tracker=tracker)
    result = trainer.fit()                    # or trainer.fit(resume_from=checkpoint_dir)

One optimizer step:
  1. set the learning rate from the schedule;
  2. take `grad_accum` micro-batches and count the units (tokens) the loss averages over, summed
     over every micro-batch and every process;
  3. forward + backward each micro-batch with loss = loss_sum * world_size / units (DDP and FSDP
     average gradients over processes, hence the world_size), syncing gradients on the last one;
  4. stop with a clear error if the loss is NaN or inf;
  5. clip the global gradient norm, step the optimizer, update the EMA.
Then, at their intervals: evaluate, checkpoint, run hooks (samples), log.

The batch source only needs `next_batch() -> dict` and `state_dict()` / `load_state_dict()`.
The objective maps (model, batch) to a summed loss (see objectives.py); before that, its `prepare`
hook does any no-grad work (rollouts, reference log-probs) with the frozen models given to the
Trainer, through a TrainContext (context.py). Evaluation and samples are plain callables, so every
stage (pretraining, SFT, reward models, DPO, PPO, GRPO) runs this loop unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from ..device import pick_device
from ..errors import UserError
from . import checkpoint as ckpt
from . import trainer_state
from .config import TrainConfig
from .context import TrainContext, freeze, move_tensors
from .distributed import (DistributedContext, broadcast_weights, full_tensor, gradient_sync, shard_model,
                          wrap_data_parallel)
from .ema import EMA
from .memory import apply_memory_options
from .objectives import MetricSums, Objective
from .optim import build_optimizer, clip_grad_norm
from .schedule import LRSchedule
from .throughput import ThroughputWindow, memory_gb, peak_flops, resolve_precision

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class BatchSource(Protocol):
    """A resumable stream of batches (lmforge.data's loaders are ones)."""

    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; training stopped before applying that step."""


@dataclass
class RunResult:
    run_dir: Path
    step: int                              # optimizer steps done
    tokens: int                            # training tokens seen (all processes)
    stop_reason: str                       # "max_steps" | "time_budget"
    elapsed_seconds: float
    train_loss: float | None               # loss of the last step
    eval_metrics: dict[str, float]         # the final evaluation (e.g. val_loss, val_ppl, val_bpb)
    checkpoint: Path | None                # the final checkpoint
    best: dict[str, Any] | None            # {"step", "val_loss", "checkpoint"} of the best checkpoint
    history: list[dict[str, float]] = field(default_factory=list)   # every logged row


def check_precision(config: TrainConfig, context: DistributedContext) -> None:
    """Refuse a resolved precision this device cannot train in (callable before anything is written)."""
    if config.precision == "fp16" and context.device.type != "cuda":
        raise UserError("precision=fp16 needs a GPU (its GradScaler is CUDA-only); use precision=bf16 on CPU")
    if config.precision == "fp16" and context.is_distributed and config.distributed == "fsdp":
        # GradScaler would decide to skip a step from each process's own gradient shard.
        raise UserError("precision=fp16 is not supported with distributed=fsdp; use precision=bf16")


class Trainer:
    """Trains `model` on batches from `batches` to minimise `objective`.

    Args:
        model: an nn.Module on the CPU; the trainer moves, shards, compiles and wraps it.
        objective: turns (model, batch) into a summed loss and metrics (objectives.py).
        batches: a resumable batch source, already split by rank (each process different data).
        config: the loop's settings (TrainConfig or a subclass).
        run_dir: where checkpoints go (rank 0 writes; the tracker writes the logs).
        context: the distributed context (default: one process on config.device).
        evaluate: called as evaluate(model) inside torch.no_grad, eval mode, autocast and the EMA
            weights; returns metrics (summed over processes by the callable itself). "val_loss",
            if present, selects the best checkpoint.
        hooks: objects with optional methods on_train_start(trainer) (after a resume has restored
            the checkpoint, before the first step), on_step_end(trainer, step, row) and
            on_train_end(trainer, step); e.g. periodic samples (use trainer.eval_model()).
        tracker: a lmforge.track.Tracker (or None for no logs).
        progress: a lmforge.track.TrainProgress (or None).
        flops_per_token: training FLOPs per token, for MFU (None: MFU not reported).
        config_dict: the config saved in checkpoints (default: config's fields).
        model_config: saved as config.json beside the weights (default: model.config.to_dict()).
        export_state: the state dict the final export writes (default: the model's own); LoRA
            passes its merged weights, so the exported run is a plain model.
        checkpoint_config: config.json of checkpoints (default: model_config); a LoRA run adds
            how to rebuild the model from its base, since its checkpoints hold the adapters only.
        frozen_models: models the objective uses but does not train (reference, reward, teacher),
            by name; moved to the device, frozen and sharded like the model, then handed to
            objective.setup(ctx) as ctx.frozen.
    """

    def __init__(self, model: nn.Module, objective: Objective, batches: BatchSource, config: TrainConfig, *,
                 run_dir: str | Path, context: DistributedContext | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 hooks: list[Any] | tuple[Any, ...] = (), tracker: Any = None, progress: Any = None,
                 flops_per_token: float | None = None, config_dict: dict[str, Any] | None = None,
                 model_config: dict[str, Any] | None = None,
                 frozen_models: dict[str, nn.Module] | None = None,
                 export_state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
                 checkpoint_config: dict[str, Any] | None = None) -> None:
        self.context = context or DistributedContext(device=pick_device(config.device))
        self.device = self.context.device
        config = dataclasses.replace(config, precision=resolve_precision(config.precision, self.device))
        self.config = config.validate()
        self.objective, self.batches, self.evaluate = objective, batches, evaluate
        self.hooks, self.tracker, self.progress = list(hooks), tracker, progress
        self.run_dir = Path(run_dir)
        self.config_dict = config_dict if config_dict is not None else dataclasses.asdict(config)
        if model_config is None and hasattr(getattr(model, "config", None), "to_dict"):
            model_config = {"format": "lmforge", **model.config.to_dict()}   # what lmforge.load reads
        self.model_config = model_config
        self.checkpoint_config = checkpoint_config if checkpoint_config is not None else model_config
        self.export_state = export_state
        check_precision(config, self.context)

        # raw: the module whose parameters are trained (sharded in place by FSDP);
        # inner: raw, compiled if asked; model: inner under DDP, what the objective calls.
        self.raw = model.to(self.device)
        apply_memory_options(self.raw, config)
        if self.context.is_distributed and config.distributed == "fsdp":
            shard_model(self.raw)
        # Extra trainable modules (a value head) are small: replicated on every process, their
        # gradients averaged by one all-reduce per step (see _sync_extra_gradients).
        self.extras = nn.ModuleDict(objective.trainable_modules()).to(self.device)
        self.optimizer = build_optimizer(self.raw, config, extras=self.extras,
                                         extras_lr_scale=getattr(objective, "extras_lr_scale", 1.0))
        # What the optimizer state is keyed by in checkpoints: the model, with the extras beside it.
        self._optimized = self.raw if not len(self.extras) else nn.ModuleDict({"model": self.raw, "extras": self.extras})
        self.ema = EMA(self.raw, config.ema_decay) if config.ema_decay > 0 else None
        self.inner = torch.compile(self.raw) if config.compile else self.raw
        self.model = (wrap_data_parallel(self.inner, self.context)
                      if self.context.is_distributed and config.distributed == "ddp" else self.inner)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.schedule = LRSchedule(config.schedule, config.lr, config.min_lr, config.warmup_steps,
                                   config.decay_fraction)
        frozen = {name: freeze(module, self.device) for name, module in (frozen_models or {}).items()}
        for module in frozen.values() if self.context.is_distributed else ():
            # Every process must hold the same frozen weights: sharded like the policy under FSDP
            # (which broadcasts first), broadcast from rank 0 under DDP.
            shard_model(module) if config.distributed == "fsdp" else broadcast_weights(module)
        self.ctx = TrainContext(self, frozen)
        objective.setup(self.ctx)
        self.flops_per_token = flops_per_token
        self.peak_flops = (peak_flops(self.device, config.precision, config.peak_flops)
                           if flops_per_token and self.context.is_main else None)

        self.step = 0
        self.tokens = 0
        self.elapsed_before = 0.0            # training time of earlier sessions (resume)
        self.best_val_loss: float | None = None
        self.history: list[dict[str, float]] = []
        self._horizon = config.max_steps or max(1, config.warmup_steps)
        self._session_start = time.perf_counter()
        self.eval_metrics: dict[str, float] = {}   # the latest evaluation
        self._eval_step = -1
        self._saved_step = -1
        self._time_up = False
        self._step_seconds: list[float] = []
        self._window = ThroughputWindow()

    # ------------------------------------------------------------------ the loop

    def fit(self, resume_from: str | Path | None = None) -> RunResult:
        """Train until max_steps or the time budget; then evaluate, checkpoint and export."""
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            # A run that spent its budget stays finished (elapsed_before is the same on every rank).
            budget = self.config.max_minutes
            self._time_up = budget is not None and self.elapsed_before >= budget * 60
        else:
            _seed_everything(self.config.seed + self.context.rank)
        for hook in self.hooks:
            if hasattr(hook, "on_train_start"):
                hook.on_train_start(self)
        if resume_from is None and self.config.eval_at_start and self.evaluate is not None:
            self._log(self.run_evaluation())          # the starting point, as step 0
        if self.context.is_main:
            ckpt.remove_stale_temporaries(self.run_dir)
        self._session_start = time.perf_counter()
        self.raw.train()
        last = None
        while not self._finished():
            started = time.perf_counter()
            last = self.train_step()
            seconds = time.perf_counter() - started
            self.step += 1
            self.tokens += last.tokens
            self._step_seconds.append(seconds)
            self._window.add(last.tokens, seconds)

            final = self._finished()
            checkpoint_due = self._due(self.config.checkpoint_interval) and not final   # the final one is below
            row: dict[str, float] = {}
            if self._due(self.config.log_interval) or self.step == 1 or final:
                row.update(self._train_row(last))
            if self.evaluate is not None and (self._due(self.config.eval_interval) or checkpoint_due or final):
                row.update(self.run_evaluation())
            self._log(row)
            if self.progress is not None:
                self.progress.update(self.step, row)
            for hook in self.hooks:
                if hasattr(hook, "on_step_end"):
                    hook.on_step_end(self, self.step, row)
            # Last, so that a run killed right after the save has logged everything up to it.
            if checkpoint_due:
                self.save_checkpoint(row.get("val_loss"), last.loss)

        # The end, whatever stopped the run: evaluation (if this session trained no step), hooks
        # (a final sample), the final checkpoint and the exported model.
        if self.evaluate is not None and self._eval_step != self.step:
            self._log(self.run_evaluation())
        for hook in self.hooks:
            if hasattr(hook, "on_train_end"):
                hook.on_train_end(self, self.step)
        checkpoint = self.save_checkpoint(self.eval_metrics.get("val_loss"), last.loss if last else None)
        self.export_model(self.run_dir)
        return RunResult(
            run_dir=self.run_dir, step=self.step, tokens=self.tokens,
            stop_reason="time_budget" if self._time_up else "max_steps",
            elapsed_seconds=self.elapsed_seconds, train_loss=last.loss if last else None,
            eval_metrics=dict(self.eval_metrics), checkpoint=checkpoint,
            best=ckpt.read_best(self.run_dir) if self.context.is_main else None, history=list(self.history),
        )

    def _finished(self) -> bool:
        """max_steps reached, or the time budget spent (rank 0's clock, shared by the last step)."""
        return (self.config.max_steps is not None and self.step >= self.config.max_steps) or self._time_up

    def train_step(self) -> "StepStats":
        """One optimizer step (self.step is the number of steps done before it)."""
        config, context = self.config, self.context
        lr = self.schedule.lr_at(self.step, self._horizon)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)    # e.g. a value head or adapter at its own rate

        micro_batches = [self._prepared(self.batches.next_batch()) for _ in range(config.grad_accum)]
        # float64 keeps the counts exact whatever the run's size.
        units = context.all_reduce_sum(torch.tensor(
            float(sum(self.objective.units(batch) for batch in micro_batches)), dtype=torch.float64,
            device=self.device)).item()
        if units == 0:
            raise UserError(f"step {self.step + 1} has no tokens to predict (every label is ignored); "
                            "check the data")
        loss_sum = torch.zeros((), device=self.device)
        metrics = MetricSums()
        tokens = 0
        for index, batch in enumerate(micro_batches):
            tokens += self.objective.tokens(batch)
            with gradient_sync(self.model, self.raw, enabled=index == len(micro_batches) - 1):
                with self.autocast():
                    output = self.objective(self.model, batch)
                self.scaler.scale(output.loss * (context.world_size / units)).backward()
            loss_sum += output.loss.detach().float()
            metrics.add(output.metrics)
        self._sync_extra_gradients()

        # One all-reduce carries the loss, metrics, tokens and rank 0's view of the clock.
        elapsed = self.elapsed_seconds
        budget = config.max_minutes * 60 if config.max_minutes is not None else None
        clock = [float(budget is not None and elapsed >= budget), self._estimate_horizon(elapsed, budget)]
        counts = torch.tensor([float(tokens), *(value if context.is_main else 0.0 for value in clock)],
                              dtype=torch.float64, device=self.device)
        local = torch.cat([loss_sum.double()[None], metrics.flat(self.device), counts])
        totals = context.all_reduce_sum(local).tolist()
        loss = totals[0] / units
        metrics = metrics.means(totals[1:-3], units)
        tokens, time_up, horizon = int(totals[-3]), totals[-2] > 0, int(totals[-1])
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            self._log({"loss": loss, "lr": lr}, step=self.step + 1)
            raise NonFiniteLossError(self._non_finite_message(loss))

        self.scaler.unscale_(self.optimizer)
        parameters = [p for p in self.trainable_parameters() if p.grad is not None]
        grad_norm = clip_grad_norm(parameters, config.grad_clip)     # grad_clip 0: only measured
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw)
        self._time_up, self._horizon = time_up, max(horizon, self.step + 1)
        return StepStats(loss, metrics, float(full_tensor(grad_norm)), tokens, lr)

    def _prepared(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A micro-batch on the device (its tensors; anything else stays), after objective.prepare."""
        batch = move_tensors(batch, self.device)
        with torch.no_grad():
            return self.objective.prepare(batch, self.ctx)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The model's and the objective's extra modules' parameters that are trained."""
        return [p for p in [*self.raw.parameters(), *self.extras.parameters()] if p.requires_grad]

    def _sync_extra_gradients(self) -> None:
        """Average the extra modules' gradients over processes (DDP/FSDP only cover the model)."""
        if not self.context.is_distributed:
            return
        for parameter in self.extras.parameters():
            if parameter.grad is not None:
                self.context.all_reduce_sum(parameter.grad).div_(self.context.world_size)

    # ------------------------------------------------------------------ evaluation

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST_DTYPES.get(self.config.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def eval_model(self) -> Iterator[nn.Module]:
        """The model to evaluate or sample from: eval mode, no grad, autocast, EMA weights if on.

        Every process must enter it together (an FSDP forward is a collective)."""
        was_training = self.raw.training
        self.raw.eval()
        ema = self.ema.applied(self.raw) if self.ema is not None else contextlib.nullcontext()
        try:
            with ema, torch.no_grad(), self.autocast():
                # The uncompiled module: evaluation is short, and a compiled model would compile a
                # second (no-grad) graph first, which costs more than it saves.
                yield self.raw
        finally:
            self.raw.train(was_training)

    def run_evaluation(self) -> dict[str, float]:
        with self.eval_model() as model:
            self.eval_metrics = {name: float(value) for name, value in self.evaluate(model).items()}
        self._eval_step = self.step
        return dict(self.eval_metrics)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, val_loss: float | None, train_loss: float | None) -> Path:
        """Save a checkpoint of the current step (every process must call it); returns its path."""
        return trainer_state.save_checkpoint(self, val_loss, train_loss)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scaler, EMA, objective state, step, RNG and data position."""
        trainer_state.load_checkpoint(self, path)

    def export_model(self, directory: str | Path) -> None:
        """Write the weights evaluation uses (EMA if on) as model.safetensors + config.json."""
        trainer_state.export_model(self, directory)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def elapsed_seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._session_start

    def _estimate_horizon(self, elapsed: float, budget: float | None) -> float:
        """The step count the schedule decays to: max_steps, or what the time budget allows."""
        if budget is None:
            return float(self.config.max_steps)
        measured = self._step_seconds[1:] or self._step_seconds   # the first step includes warm-up
        if not measured:
            return float(self._horizon)
        seconds_per_step = sum(measured[-50:]) / len(measured[-50:])
        estimate = self.step + 1 + max(0.0, budget - elapsed) / seconds_per_step
        if self.config.max_steps is not None:
            estimate = min(estimate, self.config.max_steps)
        return float(int(estimate))

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def _train_row(self, stats: "StepStats") -> dict[str, float]:
        """The logged training figures of the last step; throughput over the steps since the last row."""
        tokens_per_s = self._window.rate()
        # A Mean measured by no micro-batch of the step (NaN, e.g. a rollout figure between
        # generations) is left out of the row rather than logged as NaN.
        measured = {name: value for name, value in stats.metrics.items() if value == value}
        row = {"loss": stats.loss, **measured, "lr": stats.lr, "grad_norm": stats.grad_norm,
               "tokens_seen": self.tokens, "tokens_per_s": tokens_per_s, "elapsed_s": self.elapsed_seconds,
               "memory_gb": memory_gb(self.device)}
        if self.peak_flops:
            row["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.context.world_size)
        self._window.reset()
        return row

    def _log(self, row: dict[str, float], step: int | None = None) -> None:
        if not row:
            return
        step = self.step if step is None else step
        self.history.append({"step": step, **row})
        if self.tracker is not None:
            self.tracker.log(step, row)
        if self.progress is not None:
            if "val_loss" in row:
                described = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("val_"))
                self.progress.print(f"step {step}: {described}")

    def _non_finite_message(self, loss: float) -> str:
        checkpoints = ckpt.list_checkpoints(self.run_dir)
        kept = (f"the last good checkpoint is '{checkpoints[-1][1]}'" if checkpoints
                else "no checkpoint was saved before it")
        return (f"the training loss became {loss} at step {self.step + 1}, so training stopped ({kept}); "
                "lower lr, raise warmup_steps, keep grad_clip on, or use precision=bf16 instead of fp16")


@dataclass
class StepStats:
    loss: float                  # mean loss over the step's units (all micro-batches, all processes)
    metrics: dict[str, float]    # the objective's metrics, also means over units
    grad_norm: float             # global gradient norm before clipping
    tokens: int                  # input tokens of the step (all processes)
    lr: float


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
