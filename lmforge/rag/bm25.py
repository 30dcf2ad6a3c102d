"""BM25 (Okapi), the lexical baseline, from scratch; and reciprocal rank fusion for hybrid search.

    bm25 = BM25.build(texts, k1=1.5, b=0.75)
    scores, ids = bm25.search(["who painted the mona lisa"], k=10)

score(q, d) = sum over query terms t of  idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))
idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))      (Lucene's form: never negative)

k1 caps how much repeating a term helps (tf saturates at k1 + 1); b is how much long documents
are penalised (0 = not at all, 1 = fully by length). The index is an inverted file: for each term,
the documents it occurs in and how often (`postings`), so a query touches only its terms' rows.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import UserError

TOKEN = re.compile(r"\w+", re.UNICODE)
# A short English stop list: these terms are in nearly every passage and only add noise to BM25.
STOPWORDS = frozenset("""a an and are as at be by for from has have he her his in is it its of on or
she that the their they this to was were which who with what when where how whom why""".split())


def bm25_terms(text: str) -> list[str]:
    """Lower-cased word tokens without stop words (the same for documents and queries)."""
    return [t for t in TOKEN.findall(text.lower()) if t not in STOPWORDS]


@dataclass
class BM25:
    vocab: dict[str, int]
    offsets: torch.Tensor        # [V + 1]: postings of term t are offsets[t]:offsets[t+1]
    post_docs: torch.Tensor      # [P] document ids, grouped by term
    post_tf: torch.Tensor        # [P] term frequency in that document
    doc_len: torch.Tensor        # [N] terms per document
    k1: float = 1.5
    b: float = 0.75

    @classmethod
    def build(cls, texts: Iterable[str], k1: float = 1.5, b: float = 0.75) -> "BM25":
        if k1 < 0 or not 0 <= b <= 1:
            raise UserError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, not k1={k1}, b={b}")
        vocab: dict[str, int] = {}
        term_ids: list[int] = []
        doc_ids: list[int] = []
        lengths: list[int] = []
        for doc, text in enumerate(texts):
            terms = bm25_terms(text)
            lengths.append(len(terms))
            term_ids.extend(vocab.setdefault(t, len(vocab)) for t in terms)
            doc_ids.extend([doc] * len(terms))
        if not lengths:
            raise UserError("BM25 needs at least one document")
        n_docs = len(lengths)
        # Count each (term, doc) pair once: unique over one combined key, sorted by term then doc.
        keys = torch.tensor(term_ids, dtype=torch.long) * n_docs + torch.tensor(doc_ids, dtype=torch.long)
        pairs, tf = torch.unique(keys, return_counts=True)
        terms = pairs // n_docs
        offsets = torch.zeros(len(vocab) + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(terms, minlength=len(vocab)).cumsum(0)
        return cls(vocab, offsets, pairs % n_docs, tf.float(), torch.tensor(lengths, dtype=torch.float), k1, b)

    def __len__(self) -> int:
        return self.doc_len.shape[0]

    def idf(self, df: torch.Tensor | float) -> torch.Tensor:
        n = len(self)
        return torch.log1p((n - torch.as_tensor(df, dtype=torch.float) + 0.5) / (torch.as_tensor(df) + 0.5))

    def scores(self, query: str) -> torch.Tensor:
        """BM25 score of `query` against every document: [N]."""
        avgdl = float(self.doc_len.mean()) or 1.0
        norm = self.k1 * (1 - self.b + self.b * self.doc_len / avgdl)             # [N]
        out = torch.zeros(len(self))
        for term in set(bm25_terms(query)):   # a repeated query term counts once (as in Lucene)
            t = self.vocab.get(term)
            if t is None:
                continue
            start, end = int(self.offsets[t]), int(self.offsets[t + 1])
            docs, tf = self.post_docs[start:end], self.post_tf[start:end]
            out.index_add_(0, docs, self.idf(end - start) * tf * (self.k1 + 1) / (tf + norm[docs]))
        return out

    def search(self, queries: Sequence[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries -> (scores [Q, k], ids [Q, k]) best first; documents scoring 0 come last."""
        if k < 1:
            raise UserError(f"k={k} must be 1 or more")
        k = min(k, len(self))
        results = [self.scores(q).topk(k) for q in queries]
        return torch.stack([r.values for r in results]), torch.stack([r.indices for r in results])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bm25_offsets": self.offsets, "bm25_docs": self.post_docs, "bm25_tf": self.post_tf,
                "bm25_doc_len": self.doc_len}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], vocab: list[str], k1: float, b: float) -> "BM25":
        return cls({t: i for i, t in enumerate(vocab)}, tensors["bm25_offsets"], tensors["bm25_docs"],
                   tensors["bm25_tf"], tensors["bm25_doc_len"], k1, b)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int, c: float = 60.0) -> list[tuple[int, float]]:
    """Cormack et al. (2009): score(d) = sum over rankings of 1 / (c + rank of d), rank from 1.

    Only ranks are used, so BM25's unbounded scores and cosine similarities need no calibration;
    c = 60 is the paper's constant (it damps the weight of the very first ranks)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            if doc >= 0:
                fused[doc] = fused.get(doc, 0.0) + 1.0 / (c + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]


def idf_reference(n_docs: int, df: int) -> float:
    """The idf formula in plain Python (for tests and readers)."""
    return math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
