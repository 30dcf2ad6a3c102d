"""lmforge.train: one training loop; objectives (causal LM, masked LM, later SFT/DPO/...) plug in.

    from lmforge.train import load_pretrain_config, pretrain
    result = pretrain(load_pretrain_config("shakespeare-gpt", ["max_steps=100"]))

    from lmforge.train import Trainer, TrainConfig, CausalLMObjective   # the loop on your own data
    result = Trainer(model, CausalLMObjective(), batches, TrainConfig(max_steps=50), run_dir="runs/x").fit()

Names are imported on first use, so `lmforge pretrain --help` does not load torch.
"""
from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "TrainConfig": "lmforge.train.config",
    "PretrainConfig": "lmforge.train.config",
    "load_pretrain_config": "lmforge.train.config",
    "pretrain": "lmforge.train.pretraining",
    "Trainer": "lmforge.train.loop",
    "RunResult": "lmforge.train.loop",
    "NonFiniteLossError": "lmforge.train.loop",
    "Objective": "lmforge.train.objectives",
    "ObjectiveOutput": "lmforge.train.objectives",
    "CausalLMObjective": "lmforge.train.objectives",
    "MaskedLMObjective": "lmforge.train.objectives",
    "AdamW": "lmforge.train.optim",
    "build_optimizer": "lmforge.train.optim",
    "parameter_groups": "lmforge.train.optim",
    "LRSchedule": "lmforge.train.schedule",
    "EMA": "lmforge.train.ema",
    "SampleHook": "lmforge.train.samples",
    "latest_checkpoint": "lmforge.train.checkpoint",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
