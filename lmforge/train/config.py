"""Training configs.

`TrainConfig` holds what the one training loop needs (batching, optimizer, schedule, precision,
evaluation, checkpoints, tracking). Every stage reuses it: pretraining subclasses it as
`PretrainConfig` (data + model), and SFT/DPO/... add their own fields the same way.

Recipes (`configs/*.yaml`) set these keys; the command line overrides them with `key=value`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import config_from_dict, load_yaml, parse_overrides, resolve_recipe
from ..errors import UserError
from ..model.config import ModelConfig
from ..model.presets import PRESETS, get_preset

OPTIMIZERS = ("adamw", "torch", "fused")      # ours (from scratch) | torch.optim.AdamW | torch's fused kernel
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Settings of the training loop, shared by every training stage."""

    name: str = "run"                   # the run lives in out_dir/name
    out_dir: str = "runs"
    seed: int = 1337
    device: str = "auto"                # auto (cuda when available) | cpu | cuda | cuda:N
    # One optimizer step sees batch_size * grad_accum * world_size sequences.
    batch_size: int = 16                # sequences per micro-batch, per process
    grad_accum: int = 1                 # micro-batches per optimizer step
    # The run stops at whichever limit comes first; max_minutes is a wall-clock budget.
    max_steps: int | None = 1000
    max_minutes: float | None = None
    # AdamW
    optimizer: str = "adamw"            # adamw (from scratch) | torch | fused (torch's fused kernel)
    lr: float = 1e-3
    min_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1           # not applied to norms, biases and embeddings
    grad_clip: float = 1.0              # max global gradient norm; 0 = no clipping
    # Learning-rate schedule
    schedule: str = "cosine"            # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2         # wsd: the last fraction of the steps decays linearly to min_lr
    ema_decay: float = 0.0              # EMA of the weights (e.g. 0.999); 0 = off. Evaluation uses the EMA.
    # Speed and numerics
    precision: str = "fp32"             # auto | fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, GPU only);
                                        # auto = bf16 on GPU, and on CPU whichever matmul is measured faster
    compile: bool = False               # torch.compile the model
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% slower
    trim_host_memory: int = 0           # CPU: hand freed memory back to the OS after every N-th block (0 = off)
    distributed: str = "ddp"            # under torchrun: ddp | fsdp (FSDP2 fully_shard)
    # Logging, evaluation and checkpoints; intervals are in optimizer steps (0 = only at the end)
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int | None = 20       # validation batches per process per evaluation; None = the whole split
    eval_at_start: bool = False         # also evaluate before the first step (logged as step 0; not on resume)
    checkpoint_interval: int = 100
    keep_last: int = 2                  # checkpoints kept besides the best one
    progress: bool = True               # live progress bar (tokens/s, loss, ETA)
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str | None = None
    peak_flops: float | None = None     # per device, for MFU; None = a quick matmul measurement

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self) -> "TrainConfig":
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not '{self.optimizer}'"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, not '{self.schedule}'"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'"),
            (self.distributed in STRATEGIES, f"distributed must be one of {', '.join(STRATEGIES)}, not '{self.distributed}'"),
            (self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be positive"),
            (self.max_steps is not None or self.max_minutes is not None,
             "set max_steps or max_minutes (or both), otherwise the run never ends"),
            (self.max_steps is None or self.max_steps > 0, "max_steps must be positive"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes must be positive"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "lr must be positive and min_lr between 0 and lr"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
             "eps must be positive; weight_decay and grad_clip must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.decay_fraction <= 1, "decay_fraction must be in [0, 1]"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1) (0 turns EMA off)"),
            (min(self.log_interval, self.eval_interval, self.checkpoint_interval) >= 0,
             "log_interval, eval_interval and checkpoint_interval must be >= 0"),
            (self.eval_batches is None or self.eval_batches > 0, "eval_batches must be positive (or none for all)"),
            (self.keep_last >= 1, "keep_last must be at least 1"),
            (self.peak_flops is None or self.peak_flops > 0, "peak_flops must be positive"),
            (bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
             f"name '{self.name}' must be a plain directory name (no '/')"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message}; fix the config")
        return self


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining a GPT (causal LM) or a BERT (masked LM) on token shards."""

    data: str = "data/shakespeare"     # shard directory written by `lmforge data prepare`
    tokenizer: str | None = None        # default: the tokenizer the shards were prepared with
    seq_len: int = 256                  # tokens per training sequence
    mask_prob: float = 0.15             # masked LM: share of tokens to predict
    # The model. In a recipe or on the command line, `preset` fills the model section and `model.*`
    # keys override single fields (in Python, pass model=get_preset(...)). model.vocab_size is
    # always set from the shards' tokenizer.
    preset: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    # Samples from the causal LM during training (0 = only at the end)
    sample_interval: int = 100
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50

    def validate(self) -> "PretrainConfig":
        super().validate()
        if self.seq_len < 2:
            raise UserError(f"seq_len must be at least 2, not {self.seq_len}; fix the config")
        if not 0 < self.mask_prob < 1:
            raise UserError(f"mask_prob must be in (0, 1), not {self.mask_prob}; fix the config")
        if self.sample_interval < 0 or self.sample_tokens < 0 or self.temperature < 0 or self.top_k < 0:
            raise UserError("sample_interval, sample_tokens, temperature and top_k must be >= 0; fix the config")
        if self.model.is_causal and self.sample_tokens >= self.model.max_seq_len:
            raise UserError(f"sample_tokens ({self.sample_tokens}) must be below model.max_seq_len "
                            f"({self.model.max_seq_len}) to leave room for the prompt; lower sample_tokens")
        if self.seq_len > self.model.max_seq_len:
            raise UserError(f"seq_len ({self.seq_len}) is longer than model.max_seq_len ({self.model.max_seq_len}); "
                            "lower seq_len or raise model.max_seq_len")
        self.model.validate()
        return self


# ModelConfig derives these from other fields in __post_init__ when they are None.
_DERIVED_MODEL_FIELDS = ("n_kv_heads", "head_dim", "d_ff")


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_pretrain_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults <- recipe YAML <- `key=value` overrides, with the model section resolved.

    The model section starts from `preset` and takes the `model.*` keys given in the recipe or on
    the command line. Fields ModelConfig derives (head_dim, d_ff, n_kv_heads) are derived again
    from the final sizes unless set explicitly, so `model.d_model=512` also resizes d_ff. When
    model.max_seq_len is not given, it is seq_len.
    """
    raw = load_yaml(resolve_recipe(str(recipe))) if recipe is not None else {}
    raw = _deep_merge(raw, parse_overrides(overrides or []))
    # Checks every key and value type; an unknown key fails here with the list of valid keys.
    config = config_from_dict(PretrainConfig, raw)
    explicit = set((raw.get("model") or {}).keys())

    fields: dict[str, Any] = {}
    if config.preset is not None:
        get_preset(config.preset)   # a clear error for an unknown preset name
        fields.update(PRESETS[config.preset])
    fields.update({key: getattr(config.model, key) for key in explicit})
    if "max_seq_len" not in explicit:
        fields["max_seq_len"] = config.seq_len
    for key in _DERIVED_MODEL_FIELDS:
        fields.setdefault(key, None)
    return dataclasses.replace(config, model=ModelConfig(**fields)).validate()
