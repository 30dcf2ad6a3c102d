"""Attention heatmaps: what every head of a layer looks at, token by token.

    probs = capture_attention(model, inputs)          # list over layers of [B, H, T, S]
    draw_attention_grid(probs[3][0], labels, "attn.png", title="layer 3")
    for row in summarize_heads(probs[3][0]): print(row)

The model runs its explicit attention path (softmax(q k^T / sqrt(d) + mask) v written out),
which keeps the probabilities; the fast SDPA path never materialises them. `summarize_heads`
names the patterns that are easy to spot: previous-token heads (one ingredient of induction
heads), heads that park on the first token (an "attention sink"), and heads that attend to the
token itself.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_path, ensure_writable_dir
from ..model.attention import Attention


def attention_modules(model: nn.Module) -> list[Attention]:
    return [module for module in model.modules() if isinstance(module, Attention)]


@torch.no_grad()
def capture_attention(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run one forward with the explicit attention path; return each layer's probabilities [B, H, T, S]."""
    modules = attention_modules(model)
    for module in modules:
        module.capture_attention = True
    try:
        model(**inputs)
        probs = [module.last_attention_probs.cpu() for module in modules]
    finally:
        for module in modules:
            module.capture_attention = False
            module.last_attention_probs = None
    return probs


def pick_layer(n_layers: int, layer: int) -> int:
    """A layer index, Python-style (-1 is the last), checked against the model."""
    if not -n_layers <= layer < n_layers:
        raise UserError(f"--layer {layer} is out of range; this model has layers 0..{n_layers - 1} (or -1 for the last)")
    return layer % n_layers


@dataclass
class HeadSummary:
    head: int
    previous_token: float   # fraction of queries (t >= 1) whose strongest key is t - 1
    first_token: float      # ... whose strongest key is position 0
    self_token: float       # ... whose strongest key is t itself
    entropy: float          # mean entropy of the attention distributions, in bits

    @property
    def pattern(self) -> str:
        shares = {"previous token": self.previous_token, "first token (sink)": self.first_token,
                  "self": self.self_token}
        name, share = max(shares.items(), key=lambda item: item[1])
        return name if share >= 0.5 else "mixed"


def summarize_heads(probs: torch.Tensor) -> list[HeadSummary]:
    """probs: [H, T, S] for one sequence -> one summary per head (queries 1..T-1, so t-1 exists)."""
    n_heads, length, _ = probs.shape
    if length < 2:
        raise UserError("the text is one token long; attention patterns need at least two tokens")
    strongest = probs[:, 1:].argmax(dim=-1).float()                                  # [H, T-1]
    queries = torch.arange(1, length, dtype=torch.float32)
    entropy = -(probs * probs.clamp_min(1e-12).log2()).sum(-1).mean(-1)            # [H]
    return [HeadSummary(head, float((strongest[head] == queries - 1).float().mean()),
                        float((strongest[head] == 0).float().mean()),
                        float((strongest[head] == queries).float().mean()), float(entropy[head]))
            for head in range(n_heads)]


def draw_attention_grid(probs: torch.Tensor, labels: list[str], out: str | os.PathLike, title: str) -> Path:
    """probs: [H, T, S] -> a PNG with one heatmap per head (rows: queries, columns: keys)."""
    from matplotlib.figure import Figure

    n_heads, length, key_length = probs.shape
    columns = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / columns)
    cell = max(2.6, min(0.22 * length, 6.0))          # inches per heatmap, grows with the text
    figure = Figure(figsize=(columns * cell + 1.0, rows * cell + 0.8), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    show_labels = length <= 40                          # beyond that, tick labels overlap
    font = max(4.0, min(8.0, 160 / max(length, 1)))
    image = None
    for head in range(rows * columns):
        axis = axes[head // columns][head % columns]
        if head >= n_heads:
            axis.axis("off")
            continue
        image = axis.imshow(probs[head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                            interpolation="nearest", aspect="auto")
        axis.set_title(f"head {head}", fontsize=9)
        if show_labels:
            axis.set_xticks(range(key_length), labels[:key_length], rotation=90, fontsize=font)
            axis.set_yticks(range(length), labels[:length], fontsize=font)
        else:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(f"{title}  (rows: query token, columns: key token)", fontsize=11)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    out = Path(out)
    ensure_writable_dir(out.parent)   # a missing/unwritable folder is a UserError, not a traceback
    with atomic_path(out) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    return out
