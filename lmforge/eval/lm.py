"""A loaded model seen as lm-eval sees one: text in, log-likelihoods and generations out.

    lm = EvalModel.load("smollm2-135m-instruct")
    lm.loglikelihood([("Question: 2+2?\\nAnswer:", " 4"), ...])   # [(log p, is_greedy)]
    lm.loglikelihood_rolling(["a whole document ..."])           # [log p(document)]
    lm.generate(["Question: ...\\nAnswer:"], until=["\\n\\n"], max_tokens=256)

Text becomes tokens exactly as lm-eval's causal backends do it, so the scores can be compared
with lm-eval's `hf` backend: trailing spaces of a context move to its continuation, the pair is
encoded whole and split at the context's length, and an empty context is the end-of-text token.
Both `lmforge eval` and the lm-eval backend (harness.py) go through this class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import UserError
from .requests import Scorer, generate_until


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: Any
    ref: str = "model"
    max_length: int | None = None      # tokens per forward (default: model's context, at most 2048)
    batch_size: int = 16               # generation: sequences decoded together (KV-cache rows)
    batch_tokens: int = 8192           # log-likelihood: padded tokens per forward
    chat: bool = False                 # wrap generation prompts in the model's chat template
    prompt_lookup: int = 4             # greedy generation: draft tokens per step (infer/prompt_lookup.py; exact)
    _engine: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, ref: str, device: str = "cpu", dtype: str | None = None, **options: Any) -> "EvalModel":
        """lmforge.load(ref) with a clear UserError when it cannot be loaded or cannot score text."""
        import lmforge

        try:
            model, tokenizer = lmforge.load(ref, device=device, dtype=dtype)
        except UserError as error:
            raise UserError(f"the model '{ref}' cannot be loaded: {error}") from None
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise UserError(f"the model '{ref}' cannot be loaded ({type(error).__name__}: {error}); pass a "
                            "run directory, an HF directory, a .gguf file or a bundled name") from None
        if getattr(model.config, "arch", "gpt") != "gpt":
            raise UserError(f"the model '{ref}' is a masked LM (BERT); benchmarks need a causal LM")
        if tokenizer is None:
            raise UserError(f"the model '{ref}' has no tokenizer; evaluate a directory that has one")
        return cls(model, tokenizer, ref=str(ref), **options)

    @property
    def scorer(self) -> Scorer:
        return Scorer(self.model, self.max_length, self.batch_tokens)

    @property
    def eot_id(self) -> int:
        for name in ("eot_id", "eos_id", "bos_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, int):
                return value
        raise UserError("the tokenizer has no end-of-text token to condition an empty context on")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) the way lm-eval's TemplateLM builds them."""
        if not context:
            ids = self.encode(continuation)
            return ([self.eot_id], ids) if ids[:1] != [self.eot_id] else (ids[:1], ids[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.encode(context + continuation), self.encode(context)
        return head, whole[len(head):]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([self.encode_pair(c, x) for c, x in pairs])

    def loglikelihood_rolling(self, texts: Sequence[str], context_len: int = 1) -> list[float]:
        return self.scorer.loglikelihood_rolling([self.encode(t) for t in texts], self.eot_id, context_len)

    def engine(self):
        from ..infer.engine import Engine

        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_batch_size=self.batch_size,
                                  max_seq_len=self.max_length, prompt_lookup=self.prompt_lookup)
        return self._engine

    def prompt_ids(self, text: str, chat: bool | None = None) -> list[int]:
        """The prompt's token ids: the text itself, or a user turn in the chat template."""
        if not (self.chat if chat is None else chat):
            return self.encode(text)
        from ..tokenizer.chat_template import render_chat_ids

        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"the model '{self.ref}' has no chat template; drop --chat (or chat: true in the task)")
        ids, _ = render_chat_ids(self.tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
        return ids

    def generate(self, prompts: Sequence[str], until: Sequence[str], max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None, chat: bool | None = None) -> list[str]:
        """Greedy (or sampled) continuations, each cut at the first stop string."""
        engine = self.engine()
        if max_tokens > engine.context_length // 2:
            # A short-context model (a 256-token speedrun GPT) cannot hold GSM8K's 256 new tokens and a
            # prompt: it gets half its context for the answer, the prompt keeps its last tokens.
            import sys

            print(f"note: {self.ref} has a {engine.context_length}-token context; generating at most "
                  f"{engine.context_length // 2} new tokens instead of {max_tokens}", file=sys.stderr)
            max_tokens = engine.context_length // 2
        budget = engine.context_length - max_tokens    # as lm-eval: keep the prompt's last tokens
        ids = [self.prompt_ids(p, chat)[-budget:] for p in prompts]
        return generate_until(engine, ids, until, max_tokens, temperature, seed)

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
