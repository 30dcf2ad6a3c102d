"""`pretrain(config)`: token shards + a GPT or BERT config -> a trained model in runs/<name>/.

    from lmforge.train import load_pretrain_config, pretrain
    config = load_pretrain_config("shakespeare-gpt", ["max_steps=200"])
    result = pretrain(config)
    print(result.eval_metrics["val_bpb"], result.run_dir)

This file only assembles the pieces (data, model, objective, evaluation, samples, tracking) and
hands them to the one Trainer. The run directory holds:

    config.yaml        the resolved config          metrics.jsonl   one row per logged step
    tokenizer/         the shards' tokenizer        samples.jsonl   generated text (GPT)
    model.safetensors  final weights (EMA if on)    checkpoints/    step-NNNNNN/ + best.json
    config.json        the ModelConfig
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import save_config, to_dict
from ..errors import UserError
from ..io import ensure_writable_dir
from . import checkpoint as ckpt
from .config import PretrainConfig
from .distributed import DistributedContext, init_distributed, shutdown_distributed
from .loop import RunResult, Trainer, check_precision
from .throughput import resolve_precision


def pretrain(config: PretrainConfig, resume: bool = False) -> RunResult:
    """Train the config's model on its shards; `resume` continues from the latest checkpoint.

    Works the same in one process and under torchrun (DDP or FSDP2, see distributed.py).
    """
    from ..data import CausalLMLoader, Masking, MaskedLMLoader, iter_eval_batches, read_meta
    from ..eval import evaluate_objective
    from ..model import build_model
    from ..model.info import count_parameters, flops_per_token
    from ..track import Tracker
    from ..track.progress import TrainProgress
    from .objectives import objective_for
    from .samples import SampleHook

    config.validate()
    context = init_distributed(config.device)
    tracker = progress = None
    run_dir = config.run_dir
    created_run_dir = False      # True once this invocation made run_dir (it then owns it)
    training = False             # setup is over: from here on the run's files are kept
    remove_run_dir = False
    try:
        # Everything that needs no run directory is checked first, so bad input writes nothing.
        meta = read_meta(config.data)
        tokenizer = _load_tokenizer(config, meta)
        # The vocabulary is the tokenizer's, whatever the preset says.
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=meta.vocab_size),
                                     precision=resolve_precision(config.precision, context.device))
        config.validate()
        check_precision(config, context)
        if context.is_main:          # only rank 0 writes
            created_run_dir = not run_dir.exists()
            ensure_writable_dir(run_dir, option="out_dir=PATH (or name=NAME)")
        resume_from = _checkpoint_to_resume(run_dir, resume, context)

        torch.manual_seed(config.seed)        # the same initial weights in every process
        model = build_model(config.model)
        causal = config.model.is_causal
        objective = objective_for(config.model.arch)
        loader_args = dict(batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed,
                           rank=context.rank, world_size=context.world_size)
        if causal:
            train_batches = CausalLMLoader(config.data, "train", **loader_args)
            masking = None
        else:
            train_batches = MaskedLMLoader(config.data, "train", mask_prob=config.mask_prob, **loader_args)
            masking = Masking.from_meta(meta, config.mask_prob)

        def evaluate(eval_model: torch.nn.Module) -> dict[str, float]:
            # The same windows (and MLM masks) at every evaluation; each process takes its share.
            batches = iter_eval_batches(config.data, "val", config.batch_size, config.seq_len,
                                        max_batches=config.eval_batches, masking=masking, seed=config.seed,
                                        rank=context.rank, world_size=context.world_size)
            return evaluate_objective(eval_model, objective, batches, device=context.device,
                                      bytes_per_token=meta.val.bytes_per_token if causal else None,
                                      reduce=context.all_reduce_sum)

        config_dict = to_dict(config)
        start_step = ckpt.load_trainer_state(resume_from)["step"] if resume_from is not None else None
        if context.is_main:
            save_config(config, run_dir / "config.yaml")
            tokenizer.save(run_dir / "tokenizer")
        tracker = Tracker(run_dir, config_dict, tensorboard=config.tensorboard, wandb=config.wandb,
                          wandb_project=config.wandb_project, is_main=context.is_main,
                          resume_step=(start_step or 0) if resume else None)
        progress = TrainProgress(total_steps=config.max_steps,
                                 budget_s=config.max_minutes * 60 if config.max_minutes else None,
                                 start_step=start_step or 0, every=max(1, config.log_interval),
                                 enabled=context.is_main and config.progress)
        hooks = []
        if causal and config.sample_tokens > 0:
            hooks.append(SampleHook(tokenizer, config.sample_prompt, config.sample_interval, config.sample_tokens,
                                    config.temperature, config.top_k, config.seed))
        trainer = Trainer(model, objective, train_batches, config, run_dir=run_dir, context=context,
                          evaluate=evaluate, hooks=hooks, tracker=tracker, progress=progress,
                          flops_per_token=flops_per_token(config.model, config.seq_len),
                          config_dict=config_dict)
        if context.is_main:
            _print_plan(config, context, count_parameters(config.model).total, resume_from)
        training = True
        result = trainer.fit(resume_from=resume_from)
        progress.close()
        if context.is_main:
            _print_result(result)
        return result
    except BaseException:
        # A setup failure must not leave a half-made run behind for `lmforge runs list` to show;
        # only a directory this call created is removed, never an existing run's files.
        remove_run_dir = created_run_dir and not training
        raise
    finally:
        if progress is not None:
            progress.close()
        if tracker is not None:
            tracker.close()
        shutdown_distributed(context)
        if remove_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def _load_tokenizer(config: PretrainConfig, meta: Any) -> Any:
    """The shards' tokenizer (for samples and for the run's tokenizer/ copy), checked against them."""
    from ..tokenizer import load_tokenizer

    path = config.tokenizer or meta.tokenizer
    if not Path(path).exists():
        raise UserError(f"tokenizer '{path}' (the one the shards in '{config.data}' were prepared with) does not "
                        "exist; set tokenizer=PATH to its directory")
    tokenizer = load_tokenizer(path)
    if tokenizer.fingerprint() != meta.tokenizer_fingerprint:
        raise UserError(f"tokenizer '{path}' is not the one the shards in '{config.data}' were prepared with; "
                        "set tokenizer=PATH to that tokenizer or prepare the shards again")
    return tokenizer


def _checkpoint_to_resume(run_dir: Path, resume: bool, context: DistributedContext) -> Path | None:
    latest = ckpt.latest_checkpoint(run_dir)
    if resume:
        if latest is None and context.is_main:
            print(f"no checkpoint in '{run_dir}' yet: starting the run from step 0", file=sys.stderr)
        return latest
    if latest is not None:
        raise UserError(f"run directory '{run_dir}' already has checkpoints; continue it with --resume, "
                        "or start a new run with name=NEW_NAME")
    return None


def _print_plan(config: PretrainConfig, context: DistributedContext, n_params: int, resume_from: Path | None) -> None:
    tokens_per_step = config.batch_size * config.grad_accum * context.world_size * config.seq_len
    kind = "GPT (causal LM)" if config.model.is_causal else "BERT (masked LM)"
    parallel = f", {context.world_size} processes ({config.distributed})" if context.is_distributed else ""
    limits = " / ".join(part for part in (f"{config.max_steps} steps" if config.max_steps else "",
                                          f"{config.max_minutes:g} min" if config.max_minutes else "") if part)
    print(f"pretrain {kind}: {n_params / 1e6:.2f}M parameters, {tokens_per_step:,} tokens/step, {limits}, "
          f"{context.device}{parallel}, {config.precision} -> {config.run_dir}"
          + (f" (resuming from {resume_from.name})" if resume_from else ""), file=sys.stderr)


def _print_result(result: RunResult) -> None:
    figures = ", ".join(f"{name} {value:.4g}" for name, value in result.eval_metrics.items())
    print(f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed_seconds:.0f}s "
          f"(stopped by {result.stop_reason.replace('_', ' ')}); {figures}; run in {result.run_dir}")
