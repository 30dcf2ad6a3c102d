"""lmforge as an lm-evaluation-harness backend: any `lmforge.load` model runs any lm-eval task.

    import lmforge.eval.harness                      # registers the model type "lmforge"
    import lm_eval
    lm_eval.simple_evaluate(model="lmforge", model_args="model=smollm2-135m-instruct",
                            tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(include_path="tasks/"))

lm-eval's own CLI cannot import a third-party backend, so `lmforge eval --harness TASKS
--include-path DIR` does the above. `TemplateLM` turns text into (context, continuation) token
pairs; this class answers them with lmforge.eval.requests (batched, length-sorted forwards with
shared-prefix KV reuse, and the continuous-batching engine for generation). Conventions follow
lm-eval's `hf` backend so the scores can be compared: an empty context and a rolling window start
from the BOS token when the tokenizer has one (else end-of-text), rolling windows are disjoint
(context_len=1), `until` always includes the end-of-sequence text, at most 256 new tokens.
"""
from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .lm import EvalModel
from .requests import generate_until


@register_model("lmforge")
class LMForgeLM(TemplateLM):
    """model_args: model=REF (anything lmforge.load accepts), device=cpu, dtype=fp32|bf16,
    batch_size=16 (generation rows), max_length (tokens per forward), max_gen_toks=256, chat=false,
    prompt_lookup=4 (greedy generation drafts this many tokens per step by prompt lookup and keeps
    what the model's own argmax agrees with: the same text in fewer forwards; 0 = off)."""

    def __init__(self, model: str = "smollm2-135m-instruct", device: str = "cpu", dtype: str | None = None,
                 batch_size: int | str = 16, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, batch_tokens: int = 8192, prompt_lookup: int | str = 4,
                 **unused: Any) -> None:
        super().__init__()
        rows = int(batch_size) if str(batch_size).isdigit() else int(max_batch_size or 16)
        self.lm = EvalModel.load(str(model), device=device, dtype=dtype, batch_size=rows,
                                 max_length=int(max_length) if max_length else None, batch_tokens=int(batch_tokens),
                                 prompt_lookup=int(prompt_lookup))
        self.tokenizer = self.lm.tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self._model_ref = str(model)

    # ----------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        for name in ("eos_id", "eot_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, int):
                return value
        raise ValueError("the tokenizer has no end-of-sequence token")

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return bos if isinstance(bos, int) else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.lm.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return self._model_ref.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ----------------------------------------------------------------- the three request types

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self.lm.scorer.loglikelihood([(list(context), list(continuation))
                                                for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        totals = self.lm.scorer.loglikelihood_rolling([self.tok_encode(t) for t in texts], self.prefix_token_id,
                                                      context_len=1)
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings go to the engine together."""
        eos = self.tokenizer.decode([self.eot_token_id])
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        engine = self.lm.engine()
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_tokens = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            budget = engine.context_length - max_tokens
            prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in indices]
            for i, text in zip(indices, generate_until(engine, prompts, until, max_tokens, temperature,
                                                       seed=1234 if temperature else None)):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from ..tokenizer.chat_template import render_chat

        return render_chat(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt)
