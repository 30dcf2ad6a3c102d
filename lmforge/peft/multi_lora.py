"""Several LoRA adapters on one base model, each row of a batch with its own (the S-LoRA/Punica idea).

    from lmforge.peft.multi_lora import load_adapters
    load_adapters(model, {"pirate": "runs/pirate/adapter", "sql": "runs/sql/adapter"})
    engine = Engine(model, tokenizer)
    engine.generate(["Hello"], params, adapter="pirate")      # adapter=None: the base model

Merging an adapter (W <- W + s B A) makes it free at inference, but then each adapter is a model
of its own: N adapters need N copies of the base weights, and requests for different adapters
cannot share a batch. Kept unmerged, an adapter costs two thin matmuls per layer, and requests
for all of them decode together:

    y_b = W x_b + b + s B_a(b) A_a(b) x_b        a(b): row b's adapter (0 = none, the base model)

How each row gets its own adapter without gathering weights per row or looping over rows. For
one layer, the A of every adapter is stacked into A_all [R, in] (R = the sum of their ranks) and
every B, scaled by its s, sits side by side in B_all [out, R] (a fused qkv's slices keep their
own rows; the rest is zero). `own` [N+1, R] is 1 where a column belongs to adapter a. Then

    h = x A_all^T                [n, T, R]     every adapter's low-rank input (R is small)
    h = h * own[a(b)]            each row keeps its own adapter's columns only
    y = W x + b + h B_all^T      [n, T, out]

That is one extra matmul pair whatever the mix, with static shapes (the compiled decode step
traces it once), at the price of reading every adapter's weights at each step. When all the
rows use one adapter (or none), only that adapter's columns are used.

DoRA rescales the rows of the adapted weight by g = m / ||W + s B A||, which is a constant vector
per adapter at inference: y = g_a(b) * (W x + h B_all^T) + b.

Which rows use which adapter is set by the caller for each forward (`AdapterSet.routed`); the
engine does it from each request's adapter (lmforge/infer/engine.py).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .targets import parent_of

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


class AdapterSet:
    """The adapters' names and the per-row routing that every MultiLoRALinear of a model reads.

    Adapter ids: 0 is the base model, i + 1 is `names[i]`.
    """

    def __init__(self, names: list[str], device: torch.device | None = None) -> None:
        self.names = list(names)
        self.index = torch.zeros(1, dtype=torch.long, device=device)   # [capacity]: row -> adapter id
        self.uniform: int | None = 0     # every row uses this adapter; None = rows differ (read `index`)

    def id_of(self, name: str | None) -> int:
        """0 for None (the base model), else the adapter's id; an unknown name is a UserError."""
        if name is None:
            return 0
        if name not in self.names:
            raise UserError(f"no adapter named '{name}' is loaded; the adapters are: {', '.join(self.names)}")
        return self.names.index(name) + 1

    def reserve(self, rows: int) -> None:
        """Make room to route `rows` rows. Call it before compiling: the compiled step reads this tensor."""
        if rows > self.index.numel():
            self.index = torch.zeros(rows, dtype=torch.long, device=self.index.device)

    @contextlib.contextmanager
    def routed(self, adapter_ids: list[int], mixed: bool = False) -> Iterator[None]:
        """Run the forward inside this block with row b using adapter `adapter_ids[b]`.

        mixed=True always takes the masked path (the compiled step: one graph whatever the rows hold)."""
        self.reserve(len(adapter_ids))
        if not mixed and len(set(adapter_ids)) == 1:
            self.uniform = adapter_ids[0]
        else:
            self.uniform = None
            self.index[:len(adapter_ids)].copy_(torch.tensor(adapter_ids, dtype=torch.long))
        try:
            yield
        finally:
            self.uniform = 0


class MultiLoRALinear(nn.Module):
    """A frozen linear layer (`base`: nn.Linear or a quantized one) with the updates of several adapters.

    x [..., in] -> [..., out]; row b of the batch (dim 0) gets adapter `adapters.index[b]`.
    """

    def __init__(self, base: nn.Module, adapters: AdapterSet, A_all: torch.Tensor, B_all: torch.Tensor,
                 columns: list[tuple[int, int]], gain: torch.Tensor | None) -> None:
        super().__init__()
        self.base, self.adapters = base, adapters
        self.in_features, self.out_features = A_all.shape[1], B_all.shape[0]
        self.columns = columns                         # adapter id -> its (start, stop) in A_all's rows
        self.register_buffer("A_all", A_all, persistent=False)          # [R, in]
        self.register_buffer("B_all", B_all, persistent=False)          # [out, R], scalings folded in
        own = torch.zeros(len(columns), A_all.shape[0], dtype=A_all.dtype)
        for adapter, (start, stop) in enumerate(columns):
            own[adapter, start:stop] = 1
        self.register_buffer("own", own, persistent=False)              # [N+1, R]
        self.register_buffer("gain", gain, persistent=False)            # DoRA: [N+1, out] (1 elsewhere) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        adapter = self.adapters.uniform
        if adapter == 0 or (adapter is not None and self.columns[adapter][0] == self.columns[adapter][1]):
            return y                                   # the base model, or an adapter that skips this layer
        inputs = x.to(self.A_all.dtype)
        if adapter is not None:
            start, stop = self.columns[adapter]
            delta = F.linear(F.linear(inputs, self.A_all[start:stop]), self.B_all[:, start:stop])
            gain = None if self.gain is None else self.gain[adapter]
        else:
            ids = self.adapters.index[:x.shape[0]]
            rows = (x.shape[0],) + (1,) * (x.dim() - 2)               # broadcast over the positions
            low_rank = F.linear(inputs, self.A_all) * self.own[ids].view(*rows, -1)
            delta = F.linear(low_rank, self.B_all)
            gain = None if self.gain is None else self.gain[ids].view(*rows, -1)
        if gain is None:
            return y + delta.to(y.dtype)
        bias = getattr(self.base, "bias", None)
        unbiased = y if bias is None else y - bias.to(y.dtype)
        out = (gain * (unbiased.to(gain.dtype) + delta)).to(y.dtype)
        return out if bias is None else out + bias.to(y.dtype)

    def extra_repr(self) -> str:
        used = sum(start != stop for start, stop in self.columns)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={used}, rank_sum={self.A_all.shape[0]}"


def has_adapter_set(model: nn.Module) -> bool:
    return getattr(model, "adapter_set", None) is not None


def load_adapters(model: nn.Module, adapters: dict[str, str | os.PathLike]) -> nn.Module:
    """Load PEFT-format LoRA adapters (name -> directory) into `model`, unmerged; returns `model`.

    The base weights are unchanged and shared by all; `model.adapter_set` names the adapters.
    Each adapter is checked against the model as `load_adapter` checks one (a UserError says what
    does not fit). Prompt-learning adapters have no per-row form here: serve one alone (merged).
    """
    from .adapter_format import load_adapter
    from .lora import has_lora, lora_layers, unload_lora
    from .prompt import is_prompt_adapter

    if not adapters:
        raise UserError("no adapters given; pass at least one NAME=DIR")
    if has_adapter_set(model) or has_lora(model):
        raise UserError("this model already has adapters; load the adapters into the base model")
    for name, directory in adapters.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UserError(f"adapter name '{name}' is not usable as a model name; use letters, digits and ._:/- "
                            "(e.g. pirate=runs/pirate/adapter)")
        if is_prompt_adapter(directory):
            raise UserError(f"'{directory}' is a prompt-learning adapter; only LoRA adapters can share one base "
                            "model per request; serve it alone with --adapter DIR")
    names = list(adapters)
    device = next(model.parameters()).device
    # path -> adapter id -> [(first output row, A [r, in], s B [rows, r], DoRA gain [rows] or None)]
    found: dict[str, dict[int, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]]] = {}
    for adapter_id, name in enumerate(names, start=1):
        load_adapter(model, adapters[name])
        with torch.no_grad():
            for path, layer in lora_layers(model):
                for piece, adapter in layer.adapted():
                    weight_rows = layer.base_weight()[piece.start:piece.stop].float()
                    gain = adapter.dora_scale(weight_rows).float() if adapter.use_dora else None
                    found.setdefault(path, {}).setdefault(adapter_id, []).append(
                        (piece.start, adapter.A.detach().float().clone(),
                         (adapter.B.detach().float() * adapter.scaling).clone(), gain))
        unload_lora(model, merge=False)
    adapter_set = AdapterSet(names, device)
    for path, per_adapter in found.items():
        base = model.get_submodule(path)
        parent, attribute = parent_of(model, path)
        setattr(parent, attribute, _stack(base, adapter_set, per_adapter, len(names), device))
    model.adapter_set = adapter_set
    return model


def _stack(base: nn.Linear, adapter_set: AdapterSet,
           per_adapter: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]],
           count: int, device: torch.device) -> MultiLoRALinear:
    """One layer's MultiLoRALinear from each adapter's slices."""
    A_parts, columns, start = [], [(0, 0)], 0
    out = base.out_features
    for adapter_id in range(1, count + 1):
        slices = per_adapter.get(adapter_id, [])
        rank = sum(A.shape[0] for _, A, _, _ in slices)
        columns.append((start, start + rank))
        A_parts += [A for _, A, _, _ in slices]
        start += rank
    A_all = torch.cat(A_parts)
    B_all = torch.zeros(out, start)
    uses_dora = any(gain is not None for slices in per_adapter.values() for *_, gain in slices)
    gain_all = torch.ones(count + 1, out) if uses_dora else None
    for adapter_id, slices in per_adapter.items():
        column = columns[adapter_id][0]
        for first_row, A, scaled_B, gain in slices:
            rows, rank = scaled_B.shape
            B_all[first_row:first_row + rows, column:column + rank] = scaled_B
            if gain is not None:
                gain_all[adapter_id, first_row:first_row + rows] = gain
            column += rank
    return MultiLoRALinear(base, adapter_set, A_all.to(device), B_all.to(device), columns,
                           None if gain_all is None else gain_all.to(device))


def parse_adapter_arguments(values: list[str] | str | None) -> list[tuple[str | None, str]]:
    """`--adapter` values: 'DIR' or 'NAME=DIR' -> [(name or None, dir)]; a repeated name is a UserError."""
    if values is None:
        return []
    parsed = []
    for value in [values] if isinstance(values, str) else values:
        name, directory = None, value
        if "=" in value and not Path(value).exists():
            name, directory = value.split("=", 1)
            if not NAME.fullmatch(name) or not directory:
                raise UserError(f"--adapter '{value}' is not NAME=DIR; e.g. --adapter pirate=runs/pirate/adapter "
                                "(names: letters, digits and ._:/-)")
        parsed.append((name, directory))
    names = [name for name, _ in parsed if name is not None]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"--adapter names '{repeated[0]}' twice; give each adapter its own name")
    return parsed
