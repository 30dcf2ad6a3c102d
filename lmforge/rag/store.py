"""The RAG index: chunks + a dense vector index and/or BM25, saved atomically with the embedder's
fingerprint. This is the API other modules (chat, serve, tools) use:

    index = load_index("runs/wiki-index")
    for p in index.search("Who painted the Mona Lisa?", k=3):    # list[Passage], best first
        p.title, p.text, p.source, p.score

On disk (DIR/):
    index.json                    the manifest, written last: it is the commit point
    chunks-<gen>.jsonl            one {"title", "text", "source", "doc_id", "part"} per line
    tensors-<gen>.safetensors     the vector index's tensors and BM25's postings
    bm25-vocab-<gen>.json         BM25's terms, in id order
A save writes a new generation's files, then atomically replaces index.json, then deletes the
old generation: a reader (or a crash at any point) sees either the old index or the new one, whole.
The manifest records each file's sha256, checked on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from ..errors import UserError
from ..io import atomic_path, read_json, write_json_atomic
from .bm25 import BM25, reciprocal_rank_fusion
from .corpus import Chunk
from .embed import Embedder
from .index import VectorIndex, build_vector_index, vector_index_from_tensors

FORMAT, VERSION = "lmforge-rag-index", 1
Retriever = Literal["dense", "bm25", "hybrid"]
RETRIEVERS = ("dense", "bm25", "hybrid")
FUSION_CANDIDATES = 50    # each retriever's top list that reciprocal rank fusion merges


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    source: str
    score: float
    chunk_id: int = -1


def passage_text(chunk: Chunk) -> str:
    """What is embedded for a chunk: its title on the first line, so a chunk from the middle of a
    document still says what it is about."""
    return f"{chunk.title}\n{chunk.text}"


@dataclass
class Index:
    chunks: list[Chunk]
    manifest: dict[str, Any]
    vectors: VectorIndex | None = None
    bm25: BM25 | None = None
    _embedder: Embedder | None = field(default=None, repr=False)

    @property
    def retriever(self) -> str:
        return self.manifest["retriever"]

    def __len__(self) -> int:
        return len(self.chunks)

    # --- query ------------------------------------------------------------------------------

    def embedder(self) -> Embedder:
        """The embedding model the index was built with, loaded on first use and checked."""
        if self._embedder is None:
            self.use_embedder(Embedder.load(self.manifest["embedder"]["name"]))
        return self._embedder

    def use_embedder(self, embedder: Embedder) -> None:
        """Query with `embedder`; refused unless it is the model that embedded the passages."""
        expected = self.manifest["embedder"]
        if embedder.fingerprint() != expected["fingerprint"]:
            raise UserError(f"this index was embedded with '{expected['name']}' (fingerprint {expected['fingerprint']}) "
                            f"but the query model '{embedder.name}' has fingerprint {embedder.fingerprint()}; "
                            "query with the same model or rebuild the index with `lmforge rag index`")
        self._embedder = embedder

    def search(self, query: str, k: int = 5, retriever: Retriever | None = None) -> list[Passage]:
        """The k best passages for `query` (retriever: the index's default unless given)."""
        if not isinstance(query, str) or not query.strip():
            raise UserError("the query is empty; give a question or some words to search for")
        return self.search_batch([query], k, retriever)[0]

    def search_batch(self, queries: Sequence[str], k: int = 5, retriever: Retriever | None = None
                     ) -> list[list[Passage]]:
        retriever = retriever or self.retriever
        if retriever not in RETRIEVERS:
            raise UserError(f"unknown retriever '{retriever}'; use one of {', '.join(RETRIEVERS)}")
        if k < 1:
            raise UserError(f"k={k} must be 1 or more")
        if retriever in ("dense", "hybrid") and self.vectors is None:
            raise UserError(f"this index was built with --retriever {self.retriever} and has no vectors; "
                            "rebuild it with --retriever dense or hybrid")
        k = min(k, len(self.chunks))
        depth = max(k, FUSION_CANDIDATES) if retriever == "hybrid" else k
        dense = bm25 = None
        if retriever in ("dense", "hybrid"):
            dense = self.vectors.search(self.embedder().encode(list(queries)), min(depth, len(self.chunks)))
        if retriever in ("bm25", "hybrid"):
            bm25 = self.bm25.search(list(queries), depth)
        results = []
        for q in range(len(queries)):
            if retriever == "hybrid":
                ranked = reciprocal_rank_fusion([dense[1][q].tolist(), bm25[1][q].tolist()], k)
            else:
                scores, ids = dense if retriever == "dense" else bm25
                ranked = [(i, s) for i, s in zip(ids[q].tolist(), scores[q].tolist()) if i >= 0]
            results.append([self._passage(i, s) for i, s in ranked])
        return results

    def _passage(self, chunk_id: int, score: float) -> Passage:
        chunk = self.chunks[chunk_id]
        return Passage(chunk.title, chunk.text, chunk.source, float(score), chunk_id)

    # --- persistence ----------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write DIR atomically (see the module docstring); an existing index there is replaced."""
        from safetensors.torch import save_file

        target = Path(directory)
        if target.exists() and not target.is_dir():
            raise UserError(f"--out '{target}' is a file; give a directory for the index")
        if target.is_dir() and any(target.iterdir()) and not (target / "index.json").is_file():
            raise UserError(f"--out '{target}' is a non-empty directory that is not a RAG index; "
                            "choose a new or empty directory (nothing there is overwritten)")
        target.mkdir(parents=True, exist_ok=True)
        old = _manifest_files(target)
        generation = uuid.uuid4().hex[:12]
        tensors = dict(self.vectors.tensors()) if self.vectors is not None else {}
        if self.bm25 is not None:
            tensors.update(self.bm25.tensors())
        files = {"chunks": f"chunks-{generation}.jsonl", "tensors": f"tensors-{generation}.safetensors",
                 "bm25_vocab": f"bm25-vocab-{generation}.json"}
        with atomic_path(target / files["chunks"]) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            for chunk in self.chunks:
                handle.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
        with atomic_path(target / files["tensors"]) as tmp:
            save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
        vocab = sorted(self.bm25.vocab, key=self.bm25.vocab.get) if self.bm25 is not None else []
        write_json_atomic(target / files["bm25_vocab"], vocab, indent=None)
        manifest = dict(self.manifest, files={role: {"name": name, "sha256": _sha256(target / name)}
                                               for role, name in files.items()}, count=len(self.chunks))
        write_json_atomic(target / "index.json", manifest)     # the commit point
        self.manifest = manifest
        for name in old - set(files.values()):
            (target / name).unlink(missing_ok=True)
        return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_files(directory: Path) -> set[str]:
    try:
        manifest = json.loads((directory / "index.json").read_text(encoding="utf-8"))
        return {entry["name"] for entry in manifest.get("files", {}).values()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return set()


def build_index(chunks: list[Chunk], embedder: Embedder | None, retriever: Retriever = "hybrid",
                kind: str = "exact", nlist: int | None = None, nprobe: int = 8, k1: float = 1.5, b: float = 0.75,
                corpus: dict[str, Any] | None = None, vectors: torch.Tensor | None = None) -> Index:
    """Embed the chunks (unless `vectors` are given) and build what `retriever` needs."""
    if retriever not in RETRIEVERS:
        raise UserError(f"unknown retriever '{retriever}'; use one of {', '.join(RETRIEVERS)}")
    if not chunks:
        raise UserError("there are no chunks to index; check the corpus")
    if retriever != "bm25" and embedder is None:
        raise UserError("a dense or hybrid index needs an embedding model")
    vector_index = None
    if retriever != "bm25":
        if vectors is None:
            vectors = embedder.encode([passage_text(chunk) for chunk in chunks])
        vector_index = build_vector_index(vectors, kind, nlist=nlist, nprobe=nprobe)
    bm25 = BM25.build((passage_text(chunk) for chunk in chunks), k1=k1, b=b)
    manifest = {
        "format": FORMAT, "version": VERSION, "retriever": retriever,
        "embedder": ({"name": embedder.name, "fingerprint": embedder.fingerprint(), "dim": embedder.dim,
                      "max_seq_len": embedder.max_seq_len} if embedder is not None else None),
        "index": {"kind": vector_index.kind if vector_index is not None else None,
                  **(vector_index.params() if vector_index is not None else {})},
        "bm25": {"k1": k1, "b": b}, "corpus": corpus or {},
    }
    return Index(chunks, manifest, vector_index, bm25, embedder)


def load_index(directory: str | os.PathLike, embedder: Embedder | None = None, verify: bool = True) -> Index:
    """Read DIR written by `Index.save`. With `embedder`, queries use it (refused unless it is the
    model the index was built with); otherwise that model is loaded on the first dense query."""
    from safetensors.torch import load_file

    folder = Path(directory)
    if not (folder / "index.json").is_file():
        raise UserError(f"'{folder}' is not a RAG index (no index.json); build one with "
                        "`lmforge rag index --corpus wiki --out DIR`")
    manifest = read_json(folder / "index.json", "RAG index manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"'{folder / 'index.json'}' is not an lmforge RAG index manifest; rebuild the index")
    if manifest.get("version") != VERSION:
        raise UserError(f"the index '{folder}' has format version {manifest.get('version')}, this lmforge reads "
                        f"{VERSION}; rebuild it with `lmforge rag index`")
    paths = {}
    for role in ("chunks", "tensors", "bm25_vocab"):
        entry = manifest.get("files", {}).get(role, {})
        path = folder / str(entry.get("name", ""))
        if not entry or not path.is_file():
            raise UserError(f"the index '{folder}' lacks its {role} file; rebuild it with `lmforge rag index`")
        if verify and _sha256(path) != entry.get("sha256"):
            raise UserError(f"'{path}' does not match the checksum in index.json (corrupted or edited); rebuild the index")
        paths[role] = path
    with open(paths["chunks"], encoding="utf-8") as handle:
        chunks = [Chunk(**json.loads(line)) for line in handle if line.strip()]
    tensors = load_file(str(paths["tensors"]))
    kind = manifest["index"].get("kind")
    vectors = vector_index_from_tensors(kind, tensors, manifest["index"]) if kind else None
    bm25_params = manifest.get("bm25", {})
    vocab = read_json(paths["bm25_vocab"], "BM25 vocabulary")
    bm25 = BM25.from_tensors(tensors, vocab, bm25_params.get("k1", 1.5), bm25_params.get("b", 0.75))
    index = Index(chunks, manifest, vectors, bm25)
    if embedder is not None:
        index.use_embedder(embedder)
    return index
