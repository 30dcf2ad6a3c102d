"""A scripted causal LM for the tool tests: it writes a reply chosen by a Python function of its
context, through the real Engine (KV-cache rows, batching, stop strings, sampling).

    model, tokenizer = scripted_model(lambda context: "[calculator(2+3)→" if "→" not in context else " done")

At each prefill the script sees the decoded prompt of that row and returns the reply text; the
model then emits that reply's tokens one by one (as a one-hot logit), followed by <|endoftext|>.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lmforge.model.kv_cache import KVCache


@functools.lru_cache(maxsize=1)
def byte_tokenizer():
    """A small byte-level BPE (256 byte tokens + a few merges + the default specials)."""
    from lmforge.tokenizer.train import train_bpe_on_texts

    return train_bpe_on_texts(["the calculator said [calculator(2+3)→ 5] and then it was done. " * 20],
                              vocab_size=300)


@dataclass
class _Config:
    vocab_size: int
    max_seq_len: int = 512
    arch: str = "gpt"
    n_layers: int = 1
    n_kv_heads: int = 1
    head_dim: int = 1


class ScriptedLM(nn.Module):
    def __init__(self, tokenizer, script: Callable[[str], str]) -> None:
        super().__init__()
        self.tokenizer, self.script = tokenizer, script
        self.config = _Config(tokenizer.vocab_size)
        self.scale = nn.Parameter(torch.ones(()))       # the engine reads the device from a parameter
        self.replies: dict[int, list[int]] = {}         # cache row -> the reply it is emitting
        self.prompts: list[str] = []                     # every prefilled prompt, for assertions

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None) -> KVCache:
        return KVCache(1, batch_size, max_seq_len or self.config.max_seq_len, 1, 1)

    def hidden_states(self, ids: torch.Tensor, attention_mask=None, kv_cache=None, cache_rows=None) -> torch.Tensor:
        """ids [n, T] -> one-hot 'hidden states' [n, T, V]: the reply token due at each row's position."""
        n, length = ids.shape
        hidden = torch.zeros(n, length, self.config.vocab_size)
        for index, row in enumerate(cache_rows.tolist()):
            real = length if attention_mask is None else int(attention_mask[index].sum())
            start = int(kv_cache.lengths[row])
            if start == 0:   # a prefill: the script picks the reply from the whole prompt
                prompt = self.tokenizer.decode(ids[index, :real].tolist())
                self.prompts.append(prompt)
                self.replies[row] = self.tokenizer.encode(self.script(prompt), allow_special=False) + \
                    [self.tokenizer.eot_id]
                self.replies[row + 10_000] = [start + real]   # where the reply starts in the cache
            kv_cache.lengths[row] = start + real
            emitted = start + real - self.replies[row + 10_000][0]
            reply = self.replies[row]
            hidden[index, real - 1, reply[min(emitted, len(reply) - 1)]] = 1.0
        return hidden

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * 100.0 * self.scale


def scripted_model(script: Callable[[str], str]):
    tokenizer = byte_tokenizer()
    return ScriptedLM(tokenizer, script).eval(), tokenizer
