"""Sentence embeddings through lmforge's own BERT: all-MiniLM-L6-v2, mean-pooled and L2-normalised.

    embedder = Embedder.load("minilm-l6")
    vectors = embedder.encode(["Paris is the capital of France."])     # [N, 384], unit rows
    embedder.fingerprint()                                               # stored with every index

This is exactly sentence-transformers' recipe for all-MiniLM-L6-v2 (modules.json: Transformer ->
Pooling(mean) -> Normalize; max_seq_length 256): [CLS] text [SEP] truncated to 256 tokens, the
last hidden states averaged over the real tokens (padding excluded), then divided by their norm.
tests/test_rag_embed.py checks the vectors equal sentence-transformers' on the same text.

Texts are sorted by length before batching, so a batch pads to similar lengths (the same trick
sentence-transformers uses); the output is returned in the caller's order.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError

DEFAULT_MODEL = "minilm-l6"
MAX_SEQ_LEN = 256   # sentence_bert_config.json of all-MiniLM-L6-v2


class Embedder:
    """Wraps a BERT (`model.hidden_states`) and its tokenizer into text -> unit vectors."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = DEFAULT_MODEL,
                 max_seq_len: int = MAX_SEQ_LEN, batch_size: int = 64) -> None:
        if getattr(model.config, "arch", None) != "bert":
            raise UserError(f"the embedding model '{name}' is not a BERT (arch '{model.config.arch}'); "
                            "use an encoder such as minilm-l6")
        if tokenizer.pad_id is None or tokenizer.eos_id is None:
            raise UserError(f"the embedding model '{name}' has a tokenizer without [PAD]/[SEP]; use a BERT tokenizer")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_seq_len = min(max_seq_len, model.config.max_seq_len)
        self.batch_size = batch_size
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, ref: str = DEFAULT_MODEL, **kwargs: Any) -> "Embedder":
        from ..model.loading import load

        with warnings.catch_warnings():   # a sentence encoder has no MLM head, and needs none
            warnings.filterwarnings("ignore", message=".*no MLM head.*")
            model, tokenizer = load(ref)
        return cls(model, tokenizer, name=ref, **kwargs)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def fingerprint(self) -> str:
        """sha256 over the encoder's weights, the tokenizer and the pooling recipe: an index built with
        one embedder refuses queries embedded by any other (vectors of two models are not comparable).
        Only `transformer.*` is hashed: the MLM/pooler/classifier heads are unused here, and a sentence
        encoder's checkpoint has none, so they are freshly (randomly) initialised at every load."""
        if self._fingerprint is None:
            digest = hashlib.sha256(f"mean-pool|l2|max_seq_len={self.max_seq_len}|".encode())
            digest.update(self.tokenizer.fingerprint().encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                if not name.startswith("transformer."):
                    continue
                digest.update(name.encode())
                digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def token_ids(self, text: str) -> list[int]:
        """[CLS] text [SEP], the text cut so the whole fits max_seq_len (as HF truncation does)."""
        if not isinstance(text, str):
            raise UserError(f"texts to embed must be strings, not {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        if len(ids) > self.max_seq_len:
            ids = ids[: self.max_seq_len - 1] + [ids[-1]]
        return ids

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """texts -> float32 [N, dim], each row of norm 1 (cosine similarity = dot product)."""
        if isinstance(texts, str):
            raise UserError("encode() takes a list of texts; wrap a single text in a list")
        batch_size = batch_size or self.batch_size
        device = next(self.model.parameters()).device
        ids = [self.token_ids(text) for text in texts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(ids), self.dim)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for j, i in enumerate(rows):
                batch[j, : len(ids[i])] = torch.tensor(ids[i])
                mask[j, : len(ids[i])] = 1
            batch, mask = batch.to(device), mask.to(device)
            hidden = self.model.hidden_states(batch, mask, torch.zeros_like(batch))   # [b, T, d]
            out[rows] = mean_pool(hidden, mask).float().cpu()
        return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, d], mask [B, T] (1 = token) -> L2-normalised mean over the real tokens [B, d]."""
    weights = mask[..., None].to(hidden.dtype)
    summed = (hidden * weights).sum(1)
    mean = summed / weights.sum(1).clamp(min=1e-9)        # sentence-transformers' clamp
    return F.normalize(mean, p=2, dim=-1)                  # eps 1e-12, as Normalize() uses
