"""The shared core of the HF families: tensor name rules, the `Family` record, activations.

Our layout differs from HF's in three places, all handled by `Rule`:
- attention uses one fused `qkv` Linear (rows: all q heads, then k heads, then v heads), so
  HF's q_proj/k_proj/v_proj (or BERT's query/key/value) are concatenated along the rows;
- SwiGLU uses one fused `gate_up` Linear (gate rows first, then up);
- GPT-2 stores its Linear layers as `Conv1D`, whose weight is [in, out]: the transpose of ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...errors import UserError
from ..config import ModelConfig


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the HF tensor(s) it is made of.

    Several HF tensors are concatenated along dim 0 in the order given (`split` holds their row
    counts, so export can cut ours back apart). `conv1d` marks GPT-2 weights stored as [in, out].
    `optional` marks head weights that some HF classes lack (BertModel has no MLM head); when
    absent, our freshly initialised weights stay and the loader reports them as missing.
    """

    ours: str
    theirs: tuple[str, ...]
    split: tuple[int, ...] | None = None
    conv1d: bool = False
    optional: bool = False


def rule(ours: str, theirs: str, **options: Any) -> Rule:
    return Rule(ours, (theirs,), **options)


def linear(ours: str, theirs: str, bias: bool, **options: Any) -> list[Rule]:
    """weight (and bias) of one Linear layer."""
    rules = [rule(f"{ours}.weight", f"{theirs}.weight", **options)]
    if bias:
        rules.append(rule(f"{ours}.bias", f"{theirs}.bias", **options))
    return rules


def fused(ours: str, theirs: list[str], sizes: tuple[int, ...], bias: bool) -> list[Rule]:
    """A fused Linear made of several HF Linears stacked along the output rows."""
    rules = [Rule(f"{ours}.weight", tuple(f"{name}.weight" for name in theirs), split=sizes)]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{name}.bias" for name in theirs), split=sizes))
    return rules


def norm(ours: str, theirs: str, bias: bool, **options: Any) -> list[Rule]:
    """weight (and bias) of a LayerNorm or RMSNorm."""
    return linear(ours, theirs, bias, **options)


def qkv_sizes(config: ModelConfig) -> tuple[int, int, int]:
    kv = config.n_kv_heads * config.head_dim
    return (config.n_heads * config.head_dim, kv, kv)


# GPT-2's and BERT's activation names -> our MLP names. "gelu_new" is GPT-2's tanh approximation.
GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def gelu_activation(hf: dict[str, Any], key: str, default: str) -> str:
    name = hf.get(key) or default
    if not isinstance(name, str) or name not in GELU_NAMES:
        raise UserError(f"{key}={name!r} is not supported; supported activations: {', '.join(GELU_NAMES)}")
    return GELU_NAMES[name]


@dataclass(frozen=True)
class Family:
    """The functions and names that describe one family of HF architectures."""

    config: Callable[[dict[str, Any]], ModelConfig]       # HF config.json -> ModelConfig
    hf_config: Callable[[ModelConfig], dict[str, Any]]    # ModelConfig -> HF config.json
    rules: Callable[[ModelConfig], list[Rule]]            # the tensor name table
    base_prefix: str            # the prefix of the trunk's tensor names in the task model
    head_prefixes: tuple[str, ...]
    layer_prefix: str           # HF names of layer i start with f"{layer_prefix}{i}."
    fixed: dict[str, Any]       # ModelConfig fields every model of the family has these values for
    own_heads: tuple[str, ...] = ()  # our tensors without an HF counterpart: they keep their init
    # Renames older checkpoints' tensor names to today's (BERT's gamma/beta), or None.
    normalize_names: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


# Options every family fixes: any other value has no HF config field to express it.
COMMON_FIXED: dict[str, Any] = dict(qk_norm=False, n_experts=0)
