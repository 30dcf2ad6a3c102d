"""Text samples from a causal LM during training: the quickest sanity check there is.

Sampling here is the plain loop (re-run the model on the last max_seq_len tokens, sample the next
token); lmforge.infer has the fast engine with a KV cache. Samples draw from their own seeded
generator, so taking one never changes the training run's random stream.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def sample_tokens(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, max_seq_len: int,
                  temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> list[int]:
    """Continue `prompt_ids` by `max_new_tokens` tokens. temperature 0 = greedy; top_k 0 = no cut."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)      # [1, T]
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_seq_len:])[:, -1, :].float()            # [1, V]
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(prompt_ids):].tolist()


class SampleHook:
    """Every `interval` steps and at the end, log a sample continuing `prompt` (Trainer hook)."""

    def __init__(self, tokenizer: Any, prompt: str, interval: int, max_new_tokens: int, max_seq_len: int,
                 temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> None:
        self.tokenizer, self.prompt, self.interval = tokenizer, prompt, interval
        self.max_new_tokens, self.max_seq_len = max_new_tokens, max_seq_len
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.last_step = -1

    def on_step_end(self, trainer: Any, step: int, row: dict[str, float]) -> None:
        if self.interval and step % self.interval == 0:
            self.sample(trainer, step)

    def on_train_end(self, trainer: Any, step: int) -> None:
        if self.last_step != step:
            self.sample(trainer, step)

    def sample(self, trainer: Any, step: int) -> str:
        prompt_ids = self.tokenizer.encode(self.prompt) or [self.tokenizer.eot_id]
        generator = torch.Generator(device=trainer.device).manual_seed(self.seed + step)
        # Every process samples (an FSDP forward is a collective); only rank 0 logs.
        with trainer.eval_model():
            new_ids = sample_tokens(trainer.raw, prompt_ids, self.max_new_tokens, self.max_seq_len,
                                    self.temperature, self.top_k, generator, trainer.device)
        text = self.prompt + self.tokenizer.decode(new_ids)
        self.last_step = step
        if trainer.tracker is not None:
            trainer.tracker.log_text(step, "sample", text)
        if trainer.progress is not None:
            trainer.progress.print(f"--- sample at step {step} ---\n{text}\n---")
        return text
