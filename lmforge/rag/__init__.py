"""Retrieval-augmented generation: corpus -> chunks -> embeddings -> index -> cited answers.

    from lmforge.rag import load_index
    index = load_index("runs/wiki-index")                  # built by `lmforge rag index`
    for p in index.search("Who painted the Mona Lisa?", k=3):
        p.title, p.text, p.source, p.score

Modules: corpus.py (wiki corpus, user corpora, token chunking), embed.py (MiniLM through our BERT),
index.py (exact / IVF / faiss vector indexes), bm25.py (BM25, reciprocal rank fusion), store.py
(the Index and its on-disk format), generate.py (prompts with citations; chat/serve/web hooks),
evaluate.py (QA set, recall@k, MRR, accuracy), report.py (the recipe), commands.py (the CLI).
"""
from ..lazy import lazy_getattr

__all__ = ["Index", "Passage", "build_index", "load_index"]
# Lazy: `lmforge chat --help` imports lmforge.rag.options, which must not pull in torch.
__getattr__ = lazy_getattr(__name__, {name: f"{__name__}.store" for name in __all__})
