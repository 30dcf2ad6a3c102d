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


def tied_names(model: nn.Module) -> set[str]:
    """State-dict names that are the same tensor as an earlier one (a tied output head): stored once."""
    seen: set[int] = set()
    aliases = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            aliases.add(name)
        seen.add(id(parameter))
    return aliases
