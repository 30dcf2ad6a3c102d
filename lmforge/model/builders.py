"""Build a model from a config: the one place that maps `arch` to a class."""
from __future__ import annotations

from torch import nn

from .bert import BERT
from .config import ModelConfig
from .gpt import GPT


def build_model(config: ModelConfig) -> nn.Module:
    """ModelConfig -> randomly initialised GPT or BERT."""
    config.validate()
    return GPT(config) if config.arch == "gpt" else BERT(config)
