"""RAG evaluation: a held-out QA set built from the corpus, retrieval recall@k / MRR, IVF recall
against exact search, and answer accuracy closed-book vs with retrieved passages.

The QA set (wiki corpus): each Wikipedia entry has a one-line `description` ("Art made in Ancient
Rome and the territories it ruled") that is NOT indexed (only title + lead extract are). A question
is made from it with a template, and the answer is the article's title:
    "Which article is described as: Art made in Ancient Rome and the territories it ruled?" -> "Roman art"
Questions whose description contains the title are dropped (the answer would be in the question).
Held out: the question text never appears in the index, and the set is fixed by a seed. The gold
passage is any chunk of that article; a retriever scores a hit when one is in its top k.
"""
from __future__ import annotations

import json
import random
import re
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from .corpus import RagDocument
from .store import RETRIEVERS, Index

KS = (1, 3, 5, 10, 20)


@dataclass(frozen=True)
class QAItem:
    question: str
    answer: str
    source: str          # the gold document's source ("wikipedia:Roman art")


def question_for(doc: RagDocument) -> str:
    kind = "person" if doc.topic == "People" else "article"
    return f"Which {kind} is described as: {doc.description.rstrip('.')}?"


def build_qa(docs: Sequence[RagDocument], n: int, seed: int = 0) -> list[QAItem]:
    """`n` questions from documents with a usable description (see the module docstring)."""
    usable = [d for d in docs if len(d.description.split()) >= 3
              and normalize(answer_title(d.title)) not in normalize(d.description)]
    if not usable:
        raise UserError("no document has a usable description for a QA set; give --qa FILE.jsonl "
                        "with {\"question\", \"answer\", \"source\"} lines")
    rng = random.Random(seed)
    picked = rng.sample(usable, min(n, len(usable)))
    return [QAItem(question_for(d), d.title, d.source) for d in picked]


def read_qa(path: str | Path) -> list[QAItem]:
    items = []
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--qa '{file}' does not exist; give a JSONL file of {{question, answer, source}}")
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(QAItem(str(row["question"]), str(row["answer"]), str(row["source"])))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--qa '{file}' line {number} is not a JSON object with question, answer and "
                            "source; fix that line") from None
    if not items:
        raise UserError(f"--qa '{file}' has no questions")
    return items


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def answer_title(title: str) -> str:
    """'Mercury (planet)' -> 'Mercury': the disambiguation is not part of the answer."""
    return re.sub(r"\s*\([^)]*\)$", "", title).strip()


def is_correct(answer: str, gold: str) -> bool:
    """Lenient match: the gold title (without disambiguation) appears in the answer, normalised."""
    target = normalize(answer_title(gold))
    return bool(target) and f" {target} " in f" {normalize(answer)} "


def retrieval_metrics(index: Index, qa: Sequence[QAItem], retriever: str, ks: Sequence[int] = KS
                      ) -> dict[str, float]:
    """recall@k (a gold chunk in the top k) and MRR@max(k) for one retriever; plus queries/second."""
    start = time.perf_counter()
    results = index.search_batch([item.question for item in qa], max(ks), retriever)
    seconds = time.perf_counter() - start
    ranks = []
    for item, passages in zip(qa, results):
        rank = next((r for r, p in enumerate(passages, start=1) if p.source == item.source), None)
        ranks.append(rank)
    metrics = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / len(ranks) for k in ks}
    metrics[f"mrr@{max(ks)}"] = sum(1.0 / r for r in ranks if r is not None) / len(ranks)
    metrics["queries_per_s"] = len(qa) / seconds
    return metrics


def ivf_recall(index: Index, queries: Sequence[str], nlist: int | None, nprobes: Sequence[int], k: int = 10
               ) -> list[dict[str, float]]:
    """Recall@k of our IVF against exact search on the index's own vectors, for several nprobe."""
    from .index import ExactIndex, IVFIndex

    vectors = _all_vectors(index)
    q = index.embedder().encode(list(queries))
    exact = ExactIndex(vectors).search(q, k)[1]
    ivf = IVFIndex.build(vectors, nlist=nlist)
    rows = []
    for nprobe in nprobes:
        start = time.perf_counter()
        found = ivf.search(q, k, nprobe=nprobe)[1]
        ms = (time.perf_counter() - start) * 1000 / len(q)
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)) / exact.numel()
        rows.append({"nlist": ivf.nlist, "nprobe": nprobe, "recall@10": recall, "ms_per_query": ms})
    return rows


def _all_vectors(index: Index) -> torch.Tensor:
    vi = index.vectors
    if vi is None:
        raise UserError("this index has no vectors (built with --retriever bm25); rebuild it with dense or hybrid")
    if vi.kind == "exact":
        return vi.vectors
    if vi.kind == "ivf":   # stored sorted by cell: put them back in chunk order
        out = torch.empty_like(vi.vectors)
        out[vi.ids] = vi.vectors
        return out
    return torch.from_numpy(vi.index.reconstruct_n(0, len(vi)))


def answer_accuracy(engine: Any, index: Index, qa: Sequence[QAItem], params: Any, k: int, retriever: str
                    ) -> dict[str, Any]:
    """SmolLM2 (or any chat model) answering closed-book, then with the top-k passages."""
    from .generate import cited, generate_answers

    questions = [item.question for item in qa]
    closed = generate_answers(engine, questions, None, params)
    passages = index.search_batch(questions, k, retriever)
    opened = generate_answers(engine, questions, passages, params)
    rows = [{"question": item.question, "gold": item.answer, "closed_book": c, "rag": o,
             "gold_retrieved": any(p.source == item.source for p in ps), "citations": cited(o, len(ps))}
            for item, c, o, ps in zip(qa, closed, opened, passages)]
    n = len(rows)
    return {
        "n": n, "k": k, "retriever": retriever,
        "closed_book_accuracy": sum(is_correct(r["closed_book"], r["gold"]) for r in rows) / n,
        "rag_accuracy": sum(is_correct(r["rag"], r["gold"]) for r in rows) / n,
        "gold_in_context": sum(r["gold_retrieved"] for r in rows) / n,
        "answers_citing": sum(bool(r["citations"]) for r in rows) / n,
        "rows": rows,
    }


def evaluate_retrieval(index: Index, qa: Sequence[QAItem]) -> dict[str, dict[str, float]]:
    available = [r for r in RETRIEVERS if r == "bm25" or index.vectors is not None]
    return {retriever: retrieval_metrics(index, qa, retriever) for retriever in available}


def write_qa(path: Path, qa: Sequence[QAItem]) -> None:
    from ..io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in qa))
