"""Text samples from a causal LM during training: the quickest sanity check there is.

Generation is lmforge.infer's engine (KV cache, sampling). Each sample draws from its own seed, so
taking one never changes the training run's random stream.
"""
from __future__ import annotations

from typing import Any


class SampleHook:
    """A Trainer hook: every `interval` steps (0 = never) and at the end, log a continuation of `prompt`."""

    def __init__(self, tokenizer: Any, prompt: str, interval: int, max_new_tokens: int,
                 temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> None:
        self.tokenizer, self.prompt, self.interval = tokenizer, prompt, interval
        self.max_new_tokens, self.temperature, self.top_k, self.seed = max_new_tokens, temperature, top_k, seed
        self.last_step = -1

    def on_step_end(self, trainer: Any, step: int, row: dict[str, float]) -> None:
        if self.interval and step % self.interval == 0:
            self.sample(trainer, step)

    def on_train_end(self, trainer: Any, step: int) -> None:
        if self.last_step != step:
            self.sample(trainer, step)

    def sample(self, trainer: Any, step: int) -> str:
        from ..infer.engine import Engine
        from ..infer.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                seed=self.seed + step)
        # Every process generates (an FSDP forward is a collective); the same seed keeps them in step.
        with trainer.eval_model():
            result = Engine(trainer.raw, self.tokenizer, max_batch_size=1).generate(self.prompt, params)[0]
        text = self.prompt + result.text
        self.last_step = step
        if trainer.tracker is not None:
            trainer.tracker.log_text(step, "sample", text)
        if trainer.progress is not None:
            trainer.progress.print(f"--- sample at step {step} ---\n{text}\n---")
        return text
