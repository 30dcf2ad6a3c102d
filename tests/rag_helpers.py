"""Shared helpers for the RAG tests: a tiny random BERT behind the real MiniLM WordPiece tokenizer."""
from __future__ import annotations

import functools

import torch

from lmforge.assets import minilm_dir
from lmforge.model.builders import build_model
from lmforge.model.config import ModelConfig
from lmforge.rag.corpus import Chunk
from lmforge.rag.embed import Embedder
from lmforge.tokenizer.loading import load_tokenizer


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    return load_tokenizer(minilm_dir())


def tiny_embedder(seed: int = 0, name: str = "tiny-bert") -> Embedder:
    tokenizer = minilm_tokenizer()
    torch.manual_seed(seed)
    config = ModelConfig(arch="bert", vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=4,
                         max_seq_len=64, position="learned", norm="layernorm", norm_bias=True,
                         norm_position="post", embedding_norm=True, final_norm=False, mlp="gelu")
    return Embedder(build_model(config), tokenizer, name=name, max_seq_len=64)


TEXTS = {
    "Paris": "Paris is the capital and largest city of France, on the river Seine.",
    "Berlin": "Berlin is the capital of Germany and its largest city by population.",
    "Python": "Python is a programming language that emphasises readable code.",
    "Tomato": "The tomato is the edible berry of the plant Solanum lycopersicum.",
    "Violin": "The violin is a wooden string instrument played with a bow.",
}


def tiny_chunks() -> list[Chunk]:
    return [Chunk(title, text, f"test:{title}", i, 0) for i, (title, text) in enumerate(TEXTS.items())]
