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
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..errors import UserError
from .config import PretrainConfig
from .distributed import DistributedContext
from .loop import RunResult, Trainer, check_precision
from .session import RunSession
from .throughput import resolve_precision


def pretrain(config: PretrainConfig, resume: bool = False) -> RunResult:
    """Train the config's model on its shards; `resume` continues from the latest checkpoint.

    Works the same in one process and under torchrun (DDP or FSDP2, see distributed.py).
    """
    from ..data import CausalLMLoader, Masking, MaskedLMLoader, iter_eval_batches, read_meta
    from ..eval import evaluate_objective
    from ..model import build_model
    from ..model.info import count_parameters, flops_per_token
    from .objectives import objective_for
    from .samples import SampleHook

    config.validate()
    with RunSession(config, resume) as session:
        context = session.context
        # Everything that needs no run directory is checked first, so bad input writes nothing.
        meta = read_meta(config.data)
        tokenizer = _load_tokenizer(config, meta)
        # The vocabulary is the tokenizer's, whatever the preset says.
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=meta.vocab_size),
                                     precision=resolve_precision(config.precision, context.device))
        config.validate()
        check_precision(config, context)
        session.claim_run_dir()
        resume_from = session.checkpoint_to_resume(config)

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
        session.save_config(config)
        if context.is_main:
            tokenizer.save(session.run_dir / "tokenizer")
        tracker, progress = session.start_tracking(config_dict, resume_from)
        hooks = []
        if causal and config.sample_tokens > 0:
            hooks.append(SampleHook(tokenizer, config.sample_prompt, config.sample_interval, config.sample_tokens,
                                    config.temperature, config.top_k, config.seed))
        trainer = Trainer(model, objective, train_batches, config, run_dir=session.run_dir, context=context,
                          evaluate=evaluate, hooks=hooks, tracker=tracker, progress=progress,
                          flops_per_token=flops_per_token(config.model, config.seq_len),
                          config_dict=config_dict)
        if context.is_main:
            _print_plan(config, context, count_parameters(config.model).total, resume_from)
        result = session.fit(trainer, resume_from)
        if context.is_main:
            print_result(result)
        return result


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


def _print_plan(config: PretrainConfig, context: DistributedContext, n_params: int, resume_from: Path | None) -> None:
    tokens_per_step = config.batch_size * config.grad_accum * context.world_size * config.seq_len
    kind = "GPT (causal LM)" if config.model.is_causal else "BERT (masked LM)"
    parallel = f", {context.world_size} processes ({config.distributed})" if context.is_distributed else ""
    limits = " / ".join(part for part in (f"{config.max_steps} steps" if config.max_steps else "",
                                          f"{config.max_minutes:g} min" if config.max_minutes else "") if part)
    print(f"pretrain {kind}: {n_params / 1e6:.2f}M parameters, {tokens_per_step:,} tokens/step, {limits}, "
          f"{context.device}{parallel}, {config.precision} -> {config.run_dir}"
          + (f" (resuming from {resume_from.name})" if resume_from else ""), file=sys.stderr)


def print_result(result: RunResult) -> None:
    figures = ", ".join(f"{name} {value:.4g}" for name, value in result.eval_metrics.items())
    print(f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed_seconds:.0f}s "
          f"(stopped by {result.stop_reason.replace('_', ' ')}); {figures}; run in {result.run_dir}")
