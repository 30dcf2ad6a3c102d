"""What goes into a model and what comes out, position by position.

    report = inspect_io(model, tokenizer, "The cat sat on the mat")
    render_io(report, console)

For one text this shows the tensors a forward pass takes (`input_ids`, `attention_mask`, and for
BERT `token_type_ids`), the labels the two pretraining objectives would build from it, and the
model's top-k predictions at every position:

- causal LM (GPT): labels[t] = input_ids[t + 1], the next token; the last position has none
  (-100, which cross-entropy ignores). lmforge's loaders shift when they build the batch; HF
  models instead take labels = input_ids and shift inside the model: the same loss.
- masked LM (BERT): 15% of the ordinary tokens are chosen; of those 80% become the mask token,
  10% a random token, 10% stay; labels hold the original id there and -100 elsewhere. This uses
  the training loader's own `Masking`, so it is exactly what `lmforge pretrain` would feed.

Predictions: a GPT's logits at position t score the token *after* t; a BERT's score the token *at*
t (interesting where the text has a mask token, e.g. "Paris is the [MASK] of France.").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import encode_for_model, model_inputs, token_label

IGNORE_INDEX = -100


@dataclass
class Prediction:
    token_id: int
    token: str
    probability: float


@dataclass
class IOReport:
    arch: str
    text: str
    tokens: list[str]
    input_ids: list[int]
    attention_mask: list[int]
    token_type_ids: list[int] | None
    clm_labels: list[int]
    mlm_input_ids: list[int] | None     # None when the tokenizer has no mask token
    mlm_labels: list[int] | None
    predictions: list[list[Prediction]]  # top-k per position
    loss: float | None                  # GPT: CLM loss on the text; BERT: MLM loss on the masked example
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def causal_lm_labels(ids: list[int]) -> list[int]:
    """labels[t] = ids[t + 1]; the last position has no next token."""
    return ids[1:] + [IGNORE_INDEX]


def masked_lm_example(ids: list[int], tokenizer: Any, vocab_size: int, mask_prob: float, seed: int
                      ) -> tuple[list[int], list[int]] | None:
    """(masked input ids, labels) built by the MLM training loader's Masking, or None without a mask token."""
    from ..data.loaders import Masking

    mask_id = getattr(tokenizer, "mask_id", None)
    if mask_id is None:
        return None
    specials = tuple(sorted(set(tokenizer.special_tokens.values())))
    masking = Masking(mask_id=mask_id, vocab_size=vocab_size, special_ids=specials, mask_prob=mask_prob)
    inputs, labels = masking.apply(np.array([ids], dtype=np.int64), np.random.default_rng(seed))
    return inputs[0].tolist(), labels[0].tolist()


@torch.no_grad()
def inspect_io(model: nn.Module, tokenizer: Any, text: str, top_k: int = 5, mask_prob: float = 0.15,
               seed: int = 0) -> IOReport:
    config = model.config
    ids = encode_for_model(model, tokenizer, text)
    inputs = model_inputs(model, ids)
    logits = model(**inputs).float()[0]                                  # [T, V]
    probs = logits.softmax(dim=-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    predictions = [[Prediction(int(index), token_label(tokenizer, int(index)), float(p))
                    for p, index in zip(top.values[t], top.indices[t])] for t in range(len(ids))]
    clm_labels = causal_lm_labels(ids)
    masked = masked_lm_example(ids, tokenizer, config.vocab_size, mask_prob, seed)
    notes: list[str] = []
    loss = None
    if config.arch == "gpt":
        if len(ids) > 1:
            loss = float(F.cross_entropy(logits, torch.tensor(clm_labels, device=logits.device),
                                         ignore_index=IGNORE_INDEX))
    elif masked is not None and any(label != IGNORE_INDEX for label in masked[1]):
        masked_inputs = model_inputs(model, masked[0])
        masked_logits = model(**masked_inputs).float()[0]
        loss = float(F.cross_entropy(masked_logits, torch.tensor(masked[1], device=masked_logits.device),
                                     ignore_index=IGNORE_INDEX))
    elif masked is not None:
        notes.append(f"no token was chosen for masking at mask_prob={mask_prob}; raise --mask-prob or lengthen the text")
    if masked is None:
        notes.append("the tokenizer has no mask token, so there is no masked-LM example")
    untrained = [name for name in getattr(model, "missing_weights", []) if name.startswith("mlm_")]
    if untrained:
        notes.append("this checkpoint has no MLM head (it is a BertModel), so its predictions come from random "
                     "weights; its hidden states are the real output")
    return IOReport(
        arch=config.arch, text=text, tokens=[token_label(tokenizer, index) for index in ids], input_ids=ids,
        attention_mask=inputs["attention_mask"][0].tolist(),
        token_type_ids=inputs["token_type_ids"][0].tolist() if "token_type_ids" in inputs else None,
        clm_labels=clm_labels, mlm_input_ids=masked[0] if masked else None, mlm_labels=masked[1] if masked else None,
        predictions=predictions, loss=loss, notes=notes,
    )


def render_io(report: IOReport, console: Any, tokenizer: Any) -> None:
    """Print the report as rich tables: the input tensors and labels, then the predictions."""
    from rich.markup import escape
    from rich.table import Table

    is_gpt = report.arch == "gpt"
    console.print(f"[bold]text[/bold] {escape(repr(report.text))}  ->  {len(report.input_ids)} tokens")
    tensors = Table(title="model inputs and the labels each objective builds", header_style="bold")
    for column in ("t", "token", "input_ids", "attention_mask"):
        tensors.add_column(column, justify="right" if column != "token" else "left")
    if report.token_type_ids is not None:
        tensors.add_column("token_type_ids", justify="right")
    tensors.add_column("CLM label (next token)")
    if report.mlm_input_ids is not None:
        tensors.add_column("MLM input")
        tensors.add_column("MLM label")

    def shown(index: int) -> str:
        return "-100" if index == IGNORE_INDEX else f"{index} {escape(token_label(tokenizer, index))}"

    for t, index in enumerate(report.input_ids):
        row = [str(t), escape(report.tokens[t]), str(index), str(report.attention_mask[t])]
        if report.token_type_ids is not None:
            row.append(str(report.token_type_ids[t]))
        row.append(shown(report.clm_labels[t]))
        if report.mlm_input_ids is not None:
            changed = report.mlm_input_ids[t] != index
            row.append(("[yellow]" if changed else "") + shown(report.mlm_input_ids[t]))
            row.append(shown(report.mlm_labels[t]))
        tensors.add_row(*row)
    console.print(tensors)

    title = ("top predictions for the NEXT token at each position" if is_gpt
             else "top predictions for the token AT each position (MLM head)")
    predictions = Table(title=title, header_style="bold")
    predictions.add_column("t", justify="right")
    predictions.add_column("token")
    predictions.add_column("target" if is_gpt else "actual")
    predictions.add_column("top-k (probability)")
    for t, top in enumerate(report.predictions):
        target = report.clm_labels[t] if is_gpt else report.input_ids[t]
        cells = []
        for prediction in top:
            cell = f"{escape(prediction.token)} {prediction.probability:.2f}"
            cells.append(f"[green]{cell}[/green]" if prediction.token_id == target else cell)
        predictions.add_row(str(t), escape(report.tokens[t]),
                            "-" if target == IGNORE_INDEX else escape(token_label(tokenizer, target)),
                            "  ".join(cells))
    console.print(predictions)
    if report.loss is not None:
        kind = "causal LM loss on the text" if is_gpt else "masked LM loss on the masked example"
        console.print(f"{kind}: {report.loss:.4f} nats/token (perplexity {np.exp(report.loss):.2f})")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
