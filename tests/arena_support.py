"""Shared by the arena tests: two tiny chat models that each know one reply to PROMPT by heart.

Like web_support: the `nano` preset GPT overfit on one ChatML exchange (about a second each on a
CPU), so greedy decoding replays its reply exactly and a test can tell the two models apart by
what they say.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lmforge.eval.arena import ArenaModel
from lmforge.infer import Engine, render_chat
from lmforge.model import build_model, get_preset
from lmforge.tokenizer import train_bpe_on_texts
from threads import one_thread

PROMPT = "hello"
REPLIES = {
    "tiny-poet": "Roses are red, the sea is deep, and every tiny model sings before it goes to sleep.",
    "tiny-clerk": "Good day. Your request is noted, filed in triplicate, and will be answered by Tuesday.",
}


@functools.lru_cache(maxsize=None)
def tiny_model(reply: str, steps: int = 80) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) whose greedy reply to PROMPT is `reply`."""
    tokenizer = train_bpe_on_texts([PROMPT, reply] * 4, vocab_size=320)
    torch.manual_seed(0)
    model = build_model(get_preset("nano", vocab_size=tokenizer.vocab_size))
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": reply}]
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


def arena_models() -> tuple[ArenaModel, ArenaModel]:
    """Fresh engines over the two cached tiny models."""
    return tuple(ArenaModel(name, f"(built in code: {name})", None, Engine(*tiny_model(reply), max_batch_size=4))
                 for name, reply in REPLIES.items())  # type: ignore[return-value]
