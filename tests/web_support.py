"""Shared by the web tests: a tiny chat model that has learned one exchange by heart.

A random model replies with random bytes (control characters, half tokens), which a web page
renders unpredictably. So we overfit the `nano` preset GPT on one ChatML conversation with its
own tiny BPE tokenizer (about a second on a CPU); greedy decoding then replays `REPLY` exactly,
token by token, and the tests can check the exact text the page shows.
"""
from __future__ import annotations

import functools

import torch
from threads import one_thread
import torch.nn.functional as F

from lmforge.infer import Engine, render_chat
from lmforge.model import build_model, get_preset
from lmforge.tokenizer import train_bpe_on_texts

MODEL_NAME = "tiny-chat"
PROMPT = "hello"
REPLY = ("Hello there, friend. The quick brown fox jumps over the lazy dog, "
         "and a stitch in time saves nine.")


@functools.lru_cache(maxsize=1)
def train_tiny_chat_model(steps: int = 80) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) whose greedy reply to the user message PROMPT is REPLY.

    Cached: every web test module shares one trained model (each wraps it in its own Engine).
    """
    tokenizer = train_bpe_on_texts([PROMPT, REPLY] * 4, vocab_size=320)
    torch.manual_seed(0)
    model = build_model(get_preset("nano", vocab_size=tokenizer.vocab_size))
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REPLY}]
    ids = torch.tensor([tokenizer.encode(render_chat(tokenizer, conversation, add_generation_prompt=False))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    with one_thread():
        for _ in range(steps):
            logits = model(ids[:, :-1])                                 # [1, T-1, V]
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, tokenizer


def tiny_chat_engine(model: torch.nn.Module, tokenizer: object) -> Engine:
    """A fresh engine (own KV cache and queue) over the shared tiny model."""
    return Engine(model, tokenizer, max_batch_size=4)
