"""Held-out loss, perplexity and bits per byte.

- loss: mean cross-entropy in nats per predicted token.
- perplexity: exp(loss), the effective number of equally likely next tokens.
- bits per byte: total nats / ln 2 / total UTF-8 bytes of the text. Unlike loss and perplexity it
  does not depend on the tokenizer (a tokenizer with longer tokens has a higher loss per token but
  fewer tokens per byte), so it compares models with different vocabularies.

Bytes are counted as predicted tokens x the split's average bytes per token (meta.json records
both totals). Over the whole validation split this is exact up to the few tokens not predicted
(the first of each window); over a subset of windows it is the split's average, an approximation.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf    # exp overflows a float above ~709


def bits_per_byte(total_nats: float, total_bytes: float) -> float:
    return total_nats / math.log(2) / total_bytes


@torch.no_grad()
def evaluate_objective(model: nn.Module, objective, batches: Iterable[dict[str, torch.Tensor]], *,
                       device: torch.device | str = "cpu", bytes_per_token: float | None = None,
                       reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       prefix: str = "val_", ctx: Any = None) -> dict[str, float]:
    """Average an objective's loss and metrics over `batches`.

    Args:
        model: in eval mode (the caller chooses autocast and EMA weights).
        objective: lmforge.train.objectives (sums over units, see there).
        batches: dicts of [B, T] tensors, e.g. lmforge.data.iter_eval_batches.
        bytes_per_token: the split's UTF-8 bytes per token; adds `bpb` (causal LM only: a masked
            LM does not model the whole text, so its loss has no per-byte reading).
        reduce: sums a tensor over distributed processes (each evaluated its own batches).
        ctx: a lmforge.train.TrainContext; when given, each batch goes through objective.prepare.
    Returns: {prefix + "loss", prefix + "ppl", [prefix + "bpb"], prefix + each objective metric}.
    """
    from ..train.context import move_tensors
    from ..train.objectives import MetricSums

    # float64 sums: a large evaluation adds up millions of per-token losses.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    units = 0
    metrics = MetricSums()
    for batch in batches:
        batch = move_tensors(batch, torch.device(device))
        if ctx is not None:
            batch = objective.prepare(batch, ctx)
        output = objective(model, batch)
        loss_sum += output.loss.double()
        units += objective.units(batch)
        metrics.add(output.metrics)
    totals = torch.cat([torch.stack([loss_sum, torch.tensor(float(units), dtype=torch.float64, device=device)]),
                        metrics.flat(device)])
    if reduce is not None:
        totals = reduce(totals)
    total_nats, total_units, *sums = totals.tolist()
    if total_units == 0:
        raise ValueError("the evaluation batches hold no tokens to predict")
    loss = total_nats / total_units
    result = {f"{prefix}loss": loss, f"{prefix}ppl": perplexity(loss)}
    if bytes_per_token:
        result[f"{prefix}bpb"] = bits_per_byte(total_nats, total_units * bytes_per_token)
    result.update({f"{prefix}{name}": value for name, value in metrics.means(sums, total_units).items()})
    return result
