"""Inference: the generation engine (KV cache, batched sampling, streaming) and chat templates.

    from lmforge.infer import Engine, SamplingParams, render_chat
    engine = Engine(model, tokenizer)
    print(engine.generate(["Hello"], SamplingParams(max_new_tokens=20))[0].text)
"""
from .chat import render_chat
from .engine import Engine, GenerationResult, Sequence
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "SamplingParams", "Sequence", "render_chat"]
