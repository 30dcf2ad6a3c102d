"""The quantization lab's measurements: held-out perplexity, and LLM.int8()'s outlier census.

    ids = heldout_shakespeare_ids(tokenizer, 4096)       # the last bundled play, not seen in tuning
    ppl = perplexity(model, ids, window=256)              # exp(mean next-token cross-entropy)
    census = outlier_census(model, ids[:512])             # which Linear inputs have |x| >= 6, where

The outlier census hooks the input of every nn.Linear (what LLM.int8() quantizes per token) and
records, per layer, which input columns (hidden dimensions) hold a value with |x| >= threshold in
some token, and in how many tokens. LLM.int8()'s paper calls a dimension a systematic outlier
feature when it has such values in at least 25% of the layers and 6% of the tokens; the census
reports those for the hidden states (the inputs of the attention and MLP projections, after the norms).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


def heldout_shakespeare_ids(tokenizer, tokens: int = 4096) -> list[int]:
    """The first `tokens` token ids of the last bundled Shakespeare play (the held-out text)."""
    from ..assets import shakespeare_play_files

    files = sorted(shakespeare_play_files())
    text = files[-1].read_text(encoding="utf-8")
    start = text.find("ACT I")                    # skip the Gutenberg header
    ids = tokenizer.encode(text[max(start, 0):max(start, 0) + tokens * 8])
    if len(ids) < tokens:
        raise UserError(f"the held-out play has only {len(ids)} tokens; ask for {len(ids)} or fewer")
    return ids[:tokens]


@torch.inference_mode()
def perplexity(model: nn.Module, ids: list[int], window: int = 256, batch_size: int = 4) -> float:
    """exp(mean cross-entropy) over non-overlapping windows of `window` tokens (at most the context)."""
    window = min(window, model.config.max_seq_len)
    n = (len(ids) - 1) // window
    if n < 1:
        raise UserError(f"{len(ids)} tokens are fewer than one window of {window} + 1; give more tokens")
    data = torch.tensor(ids[: n * window + 1])
    inputs = data[:-1].view(n, window)
    targets = data[1:].view(n, window)
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, n, batch_size):
        logits = model(inputs[start:start + batch_size].to(device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), targets[start:start + batch_size].flatten().to(device),
                                 reduction="sum").item()
    return math.exp(total / (n * window))


# Layers that read the residual stream (through a norm): their inputs are the hidden states where
# LLM.int8()'s outlier features live. (attn.out reads attention values, mlp.down the MLP's inside.)
RESIDUAL_READERS = ("attn.qkv", "mlp.gate_up", "mlp.up")


@dataclass
class LayerOutliers:
    name: str
    in_features: int
    columns: list[int]                  # input columns with |x| >= threshold in some token
    tokens_with_outlier: int            # tokens with at least one such value
    tokens: int
    max_abs: float


@dataclass
class OutlierCensus:
    threshold: float
    layers: list[LayerOutliers] = field(default_factory=list)
    systematic: list[tuple[int, float, float]] = field(default_factory=list)   # (dim, layer share, token share)
    column_max: torch.Tensor | None = None     # [residual-reading layers, d_model] max |x| (the heatmap)
    top_dims: list[tuple[int, int, float]] = field(default_factory=list)   # (dim, layers hit, max token share)
    reader_layers: int = 0


@torch.inference_mode()
def outlier_census(model: nn.Module, ids: list[int], threshold: float = 6.0) -> OutlierCensus:
    """Run `ids` through `model` (one sequence, cut to its context) and record the outliers at every
    Linear's input."""
    ids = ids[: model.config.max_seq_len]
    records: dict[str, tuple[torch.Tensor, int, int]] = {}     # name -> (per-column counts, tokens hit, tokens)
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(_module, args, _out, name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                hit = x.abs() >= threshold
                records[name] = (hit.sum(0), int(hit.any(1).sum()), x.shape[0])
                maxima[name] = x.abs().amax(0)
            hooks.append(module.register_forward_hook(hook))
    try:
        model(torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        for handle in hooks:
            handle.remove()
    census = OutlierCensus(threshold)
    d_model = model.config.d_model
    per_dim_layers, per_dim_tokens, heat = torch.zeros(d_model), torch.zeros(d_model), []
    for name, (counts, with_outlier, tokens) in records.items():
        columns = torch.nonzero(counts).view(-1).tolist()
        x_max = maxima[name]
        census.layers.append(LayerOutliers(name, counts.numel(), columns, with_outlier, tokens, float(x_max.max())))
        if name.endswith(RESIDUAL_READERS) and counts.numel() == d_model:
            per_dim_layers += (counts > 0).float()
            per_dim_tokens = torch.maximum(per_dim_tokens, counts.float() / tokens)
            heat.append(x_max)
    n_layers = max(len(heat), 1)
    for dim in torch.nonzero((per_dim_layers / n_layers >= 0.25) & (per_dim_tokens >= 0.06)).view(-1).tolist():
        census.systematic.append((dim, float(per_dim_layers[dim] / n_layers), float(per_dim_tokens[dim])))
    census.column_max = torch.stack(heat) if heat else None
    census.reader_layers = len(heat)
    order = per_dim_layers.argsort(descending=True)[:8].tolist()
    census.top_dims = [(d, int(per_dim_layers[d]), float(per_dim_tokens[d])) for d in order if per_dim_layers[d] > 0]
    return census


def quantized_copy(model: nn.Module, method: str, threshold: float = 6.0,
                   calibration_ids: list[int] | None = None, tune_steps: int = 0) -> nn.Module:
    """A deep copy of `model` with `method` applied ("fp32" = the copy unchanged); with
    `calibration_ids`, nf4 / q4_0 round activation-aware (lmforge.quant.calibrate), and with
    `tune_steps` too, q4_0's / nf4's scales are then trained against `model` on them (lmforge.quant.tune)."""
    from .quantize import quantize_model

    clone = copy.deepcopy(model)
    if method == "fp32":
        return clone
    clone = quantize_model(clone, method, threshold=threshold, calibration_ids=calibration_ids)
    if tune_steps:
        from .tune import tune_scales

        if calibration_ids is None:
            raise UserError("scale tuning trains on calibration tokens; pass calibration_ids too")
        tune_scales(clone, model, calibration_ids, steps=tune_steps)
    return clone
