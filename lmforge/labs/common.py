"""What the labs tools share: turning text into a model's input, and tokens into readable labels."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError


def new_lab_dir(out_dir: str, name: str) -> Path:
    """The lab's run directory, created; refused before any work if an earlier run left one (its
    fine-tuning sub-runs would refuse to start over it, minutes in)."""
    out = Path(out_dir) / name
    if out.exists() and any(out.iterdir()):
        raise UserError(f"run directory '{out}' already exists; choose another name (name=NEW_NAME) or delete it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def require_tokenizer(tokenizer: Any, ref: str) -> Any:
    if tokenizer is None:
        raise UserError(f"model '{ref}' has no tokenizer (presets are random and come without one); "
                        "pass --tokenizer DIR (e.g. one made by `lmforge tokenizer train`)")
    return tokenizer


def encode_for_model(model: nn.Module, tokenizer: Any, text: str) -> list[int]:
    """The ids the model expects for `text`: BERT tokenizers from HF frame it as [CLS] text [SEP]."""
    if model.config.arch == "bert" and _adds_special_tokens(tokenizer):
        ids = tokenizer.encode(text, add_special_tokens=True)
    else:
        ids = tokenizer.encode(text)
    if not ids:
        raise UserError("--text encodes to no tokens; give some text")
    if len(ids) > model.config.max_seq_len:
        raise UserError(f"--text is {len(ids)} tokens but the model's context is {model.config.max_seq_len}; "
                        "shorten it")
    if max(ids) >= model.config.vocab_size:
        raise UserError(f"the tokenizer produced id {max(ids)} but the model's vocabulary has "
                        f"{model.config.vocab_size} tokens; use the model's own tokenizer")
    return ids


def _adds_special_tokens(tokenizer: Any) -> bool:
    import inspect

    return "add_special_tokens" in inspect.signature(tokenizer.encode).parameters


def token_label(tokenizer: Any, token_id: int) -> str:
    """A short printable form of one token: spaces shown as '·', newlines as '\\n', bytes as hex."""
    text = tokenizer.decode([token_id])
    if not text or "\ufffd" in text:
        # A byte-level token that is part of a multi-byte character: show its bytes.
        text = tokenizer.id_to_bytes(token_id).hex(" ") if hasattr(tokenizer, "id_to_bytes") else f"#{token_id}"
    # Control characters would be invisible (or break the table): show their escape instead.
    return "".join("·" if char == " " else char if char.isprintable() else repr(char)[1:-1] for char in text)


def model_inputs(model: nn.Module, ids: list[int]) -> dict[str, torch.Tensor]:
    """The keyword arguments of one unpadded forward: input_ids, attention_mask (+ token_type_ids for BERT)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if model.config.arch == "bert":
        inputs["token_type_ids"] = torch.zeros_like(input_ids)   # one segment
    return inputs
