"""`sft(config)`: supervised fine-tuning of any loadable model on chat data, through the one Trainer.

    from lmforge.train.sft import load_sft_config, sft
    result = sft(load_sft_config("sft-smollm2-countdown", ["max_steps=50"]))
    print(result.eval_metrics, result.run_dir / "report.md")

The base is any `lmforge.load` reference (SmolLM2, a pretraining run, an HF directory, a GGUF).
The loss is next-token cross-entropy on the assistant replies only, end-of-turn tokens included
(`train_on`), with examples packed into rows that never attend to each other. Every evaluation
measures the held-out val loss and answers held-out prompts with the chat template; when the data
comes with a scorer (reasoning-gym tasks) that gives `val_answer_accuracy`, measured by the
task's own scorer. The base model is evaluated once before training, so the report shows before
and after. The run directory is like pretraining's, and loads, chats, serves and converts:

    runs/<name>/ config.yaml  metrics.jsonl  samples.jsonl  checkpoints/  tokenizer/
                 model.safetensors  config.json  report.md  report.json  curves.png
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import build_config
from ..errors import UserError
from ..peft.lora import LoRAConfig
from ..peft.prompt import PromptConfig
from .config import TrainConfig
from .distill import DistillConfig
from .loop import RunResult, Trainer
from .session import RunSession


@dataclass
class SFTConfig(TrainConfig):
    """Fine-tuning a model on conversations (TrainConfig's keys plus these)."""

    name: str = "sft"
    model: str = "smollm2-135m-instruct"  # any lmforge.load reference: bundled name, run, HF dir, .gguf, preset
    tokenizer: str | None = None          # default: the model's own (needed for a preset)
    data: str = "chatterbot"              # sharegpt | chatterbot | reasoning-gym:TASK?size=N&seed=S | a file
    format: Literal["auto", "alpaca", "dolly", "sharegpt", "messages", "oasst", "prompt_completion"] = "auto"
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"   # last_assistant = completion only
    system_prompt: str | None = None      # added to conversations that have no system message
    max_examples: int | None = None       # read at most this many conversations
    val_examples: int = 32                # held-out conversations (val loss, answers, accuracy)
    seq_len: int = 512                    # tokens per row; longer conversations are cut after a whole reply
    packing: bool = True                  # best-fit packing with a block-diagonal mask; false = padding
    eval_prompts: int = 32                # held-out prompts answered (greedy) at each evaluation
    answer_tokens: int = 64               # new tokens per answer
    sample_count: int = 2                 # answers shown and logged as samples at each evaluation
    # Knowledge distillation from a frozen teacher (train/distill.py), on when distill.teacher is set:
    # e.g. distill.teacher=smollm2-135m-instruct distill.loss=jsd distill.beta=0.5 distill.kd_ratio=0.5
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Fine-tuning defaults: a small learning rate, no weight decay, evaluation at the start and end.
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_steps: int = 5
    weight_decay: float = 0.0
    batch_size: int = 4
    max_steps: int | None = 100
    eval_interval: int = 50
    eval_batches: int | None = None
    checkpoint_interval: int = 50
    log_interval: int = 5
    precision: str = "auto"
    eval_at_start: bool = True            # evaluate the base model first: the report's "before"
    # Parameter-efficient fine-tuning: none (every weight) | lora (adapters only; lora.* sets them,
    # e.g. lora.r=16 lora.alpha=32 lora.target_modules=all-linear lora.use_dora=true) | qlora (the
    # same adapters on a base quantized to NF4; qlora_blocksize) | prompt | prefix | ptuning
    # (virtual tokens or per-layer key/value prefixes; prompt.* sets them, needs packing=false)
    peft: Literal["none", "lora", "qlora", "prompt", "prefix", "ptuning"] = "none"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    qlora_blocksize: int = 64             # NF4 weights per absmax (double-quantized in blocks of 256)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def validate(self) -> "SFTConfig":
        super().validate()
        self.distill.validate()
        checks = [
            (self.seq_len >= 8, f"seq_len must be at least 8, not {self.seq_len}"),
            (self.val_examples >= 1, "val_examples must be at least 1"),
            (self.eval_prompts >= 0 and self.sample_count >= 0, "eval_prompts and sample_count must be >= 0"),
            (self.answer_tokens >= 1, "answer_tokens must be at least 1"),
            (self.max_examples is None or self.max_examples > 1, "max_examples must be more than 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message}; fix the config")
        if self.peft in ("lora", "qlora"):
            self.lora.validate()
        if self.peft in ("prompt", "prefix", "ptuning"):
            self.prompt.validate()
            if self.packing:
                raise UserError(f"peft={self.peft} prepends virtual tokens to each row, which packed rows "
                                "(several examples per row) cannot share; add packing=false")
        return self


def load_sft_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> SFTConfig:
    """Defaults <- recipe YAML <- key=value overrides (an unknown key lists the valid ones)."""
    return build_config(SFTConfig, recipe, overrides)


def sft(config: SFTConfig, resume: bool = False) -> RunResult:
    """Fine-tune config.model on config.data; `resume` continues from the latest checkpoint."""
    from ..model.info import count_parameters, flops_per_token
    from .distill import DistillObjective, plan_distillation
    from .objectives import SFTObjective
    from .sft_data import prepare_sft_data
    from .sft_eval import SFTEvaluation, write_report

    config.validate()
    with RunSession(config, resume) as session:
        context = session.context
        config = session.with_precision(config)
        # Inputs are checked before anything is written: the model, its tokenizer, the data.
        model, tokenizer = load_causal_lm(config.model, config.tokenizer, config.seed, qlora=qlora_settings(config))
        if config.seq_len > model.config.max_seq_len:
            raise UserError(f"seq_len={config.seq_len} is longer than the model's context "
                            f"({model.config.max_seq_len}); lower seq_len")
        started = time.perf_counter()
        # Distillation: the teacher is loaded (and the student shrunk) before the data, since
        # sequence-level KD rewrites the training replies with the teacher's answers.
        plan = plan_distillation(config, model, tokenizer, context)   # None: no teacher
        data = prepare_sft_data(config, tokenizer, context.rank, context.world_size,
                                rewrite=plan.rewrite if plan is not None else None)
        resume_from, config_dict, tracker, progress = session.open_run(config, tokenizer)
        evaluation = SFTEvaluation(config, tokenizer, data, context)
        model, adapters = _with_adapters(model.float(), config, tokenizer)
        objective = (DistillObjective(config.distill, tokenizer, config.seq_len, config.seed)
                     if plan is not None and plan.level == "token" else SFTObjective())
        trainer = Trainer(model, objective, data.train, config, run_dir=session.run_dir,
                          frozen_models=plan.frozen_models if plan is not None else None,
                          context=context, evaluate=evaluation, tracker=tracker, progress=progress, **adapters,
                          flops_per_token=flops_per_token(model.config, config.seq_len,
                                                          head_fraction=data.trained_tokens / data.train_tokens),
                          config_dict=config_dict)
        evaluation.trainer = trainer
        if context.is_main:
            _print_plan(config, data, count_parameters(model.config).total, context.world_size, resume_from, model)
            if plan is not None:
                print(plan.describe(config), file=sys.stderr)
        result = session.fit(trainer, resume_from)
        if context.is_main and config.peft != "none":
            save_run_adapter(trainer.raw, config, session.run_dir)
        if context.is_main:
            report = write_report(config, data, evaluation, result, time.perf_counter() - started)
            _print_result(result, report)
        return result


def _with_adapters(model: torch.nn.Module, config: SFTConfig, tokenizer: Any = None
                   ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model to train (LoRA adapters on a frozen base when peft=lora) and the Trainer options
    that go with it: checkpoints keep the adapters and name the base, the export is merged."""
    if config.peft == "none":
        return model, {}
    model_config = {"format": "lmforge", **model.config.to_dict()}
    if config.peft in ("prompt", "prefix", "ptuning"):
        from ..peft.prompt import apply_prompt_tuning, base_state_dict

        settings = dataclasses.replace(config.prompt, method=config.peft)
        model = apply_prompt_tuning(model, settings, tokenizer=tokenizer)
        rebuild = {"base_model": config.model, "peft": {"type": config.peft, **dataclasses.asdict(settings)}}
        # The exported run is the base itself (a prompt cannot be folded into weights); the adapter
        # directory beside it (adapter/) holds the prompt, in PEFT's format.
        return model, {"export_state": base_state_dict,
                       "model_config": model_config, "checkpoint_config": {**model_config, **rebuild}}
    from ..peft.lora import apply_lora, merged_state_dict

    settings = dataclasses.asdict(config.lora)
    if config.peft == "qlora":
        from ..peft.qlora import apply_qlora, has_qlora, qlora_merged_state_dict

        if not has_qlora(model):               # not already loaded as QLoRA (load_causal_lm(qlora=...))
            apply_qlora(model, config.lora, blocksize=config.qlora_blocksize)
        settings["blocksize"] = config.qlora_blocksize
        export_state = qlora_merged_state_dict
    else:
        apply_lora(model, config.lora)
        export_state = merged_state_dict
    rebuild = {"base_model": config.model, "peft": {"type": config.peft, **settings}}
    return model, {"export_state": export_state, "checkpoint_config": {**model_config, **rebuild}}


def save_run_adapter(model: torch.nn.Module, config: SFTConfig, run_dir: Path) -> Path | None:
    """Write the trained adapter in PEFT's format to run_dir/adapter (None when PEFT has no format
    for this model: then the checkpoints and the merged export are the way to use it)."""
    directory = run_dir / "adapter"
    try:
        if config.peft in ("prompt", "prefix", "ptuning"):
            from ..peft.prompt import save_prompt_adapter

            return save_prompt_adapter(model, directory, base_model_name_or_path=config.model)
        from ..peft.adapter_format import save_adapter

        return save_adapter(model, directory, base_model_name_or_path=config.model)
    except UserError as error:
        print(f"note: no PEFT adapter written ({error})", file=sys.stderr)
        return None


def qlora_settings(config: Any) -> tuple[LoRAConfig, int] | None:
    """(adapters, NF4 blocksize) when `config` (SFT, DPO, ...) asks for peft=qlora, else None."""
    return (config.lora, config.qlora_blocksize) if getattr(config, "peft", "none") == "qlora" else None


def load_causal_lm(model_reference: str, tokenizer_reference: str | None, seed: int,
                   qlora: tuple[LoRAConfig, int] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for fine-tuning (SFT, DPO, reward models, CAI): a GPT with a tokenizer.

    Seeded first, so a preset's random weights are the same in every process and run.
    qlora: (adapters, blocksize) loads the base straight into NF4 with those adapters, one layer
    at a time (peft/qlora_loading.py), so the whole fp32 model is never in memory."""
    from ..model.loading import load

    torch.manual_seed(seed)
    if qlora is not None:
        from ..peft.qlora_loading import load_qlora

        model, tokenizer = load_qlora(model_reference, qlora[0], blocksize=qlora[1],
                                      tokenizer=_tokenizer_reference(tokenizer_reference))
    else:
        model, tokenizer = load(model_reference, tokenizer=_tokenizer_reference(tokenizer_reference))
    if tokenizer is None:
        raise UserError(f"model '{model_reference}' has no tokenizer; set tokenizer=PATH (a tokenizer directory "
                        "or a model whose tokenizer to use)")
    if getattr(model.config, "arch", "gpt") != "gpt":
        raise UserError(f"model '{model_reference}' is a BERT (masked LM); fine-tuning here needs a causal LM (a GPT)")
    return model, tokenizer


def _tokenizer_reference(reference: str | None) -> Any:
    """A tokenizer directory, or a model reference whose tokenizer to take (e.g. smollm2-135m-instruct)."""
    if reference is None or Path(reference).is_dir() and (Path(reference) / "tokenizer.json").is_file():
        return reference
    from ..model.loading import BUNDLED, locate

    source = locate(reference)
    if source.kind == "gguf":
        from ..tokenizer import BPETokenizer

        return BPETokenizer.from_gguf(source.path)
    if source.tokenizer is not None:
        return source.tokenizer
    if source.path is not None:
        return source.path
    raise UserError(f"tokenizer '{reference}' is neither a tokenizer directory nor a model with a tokenizer "
                    f"(e.g. {', '.join(BUNDLED)})")


def _print_plan(config: SFTConfig, data: Any, n_params: int, world_size: int, resume_from: Path | None,
                model: torch.nn.Module) -> None:
    rows = len(data.train.rows)
    trained = data.trained_tokens / max(1, data.train_tokens)
    if config.peft in ("lora", "qlora"):
        from ..peft.lora import describe_lora

        print(f"{config.peft}: {describe_lora(model)}", file=sys.stderr)
    if config.peft == "qlora":
        from ..peft.qlora import describe_qlora

        print(f"  {describe_qlora(model)}", file=sys.stderr)
    if config.peft in ("prompt", "prefix", "ptuning"):
        from ..peft.prompt import describe_prompt

        print(f"{config.peft}: {describe_prompt(model)}", file=sys.stderr)
    print(f"sft {config.model} ({n_params / 1e6:.1f}M parameters) on {config.data}: {data.conversations} "
          f"conversations, {len(data.prompts)} held-out prompts{' (scored)' if data.scored else ''}",
          file=sys.stderr)
    print(f"  train: {data.report.describe()}; {rows} {'packed ' if config.packing else ''}rows of <= "
          f"{config.seq_len} tokens, {data.train_tokens:,} tokens/epoch, {trained:.0%} trained on (train_on="
          f"{config.train_on}); {config.batch_size * config.grad_accum * world_size} rows/step, {config.precision} "
          f"-> {config.run_dir}" + (f" (resuming from {resume_from.name})" if resume_from else ""), file=sys.stderr)


def _print_result(result: RunResult, report: Path) -> None:
    figures = ", ".join(f"{name} {value:.4g}" for name, value in result.eval_metrics.items())
    print(f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed_seconds:.0f}s; {figures}",
          file=sys.stderr)
    print(f"report: {report}")
