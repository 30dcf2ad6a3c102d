"""BM25 against a case computed by hand, and reciprocal rank fusion."""
from __future__ import annotations

import math

import pytest

from lmforge.errors import UserError
from lmforge.rag.bm25 import BM25, bm25_terms, reciprocal_rank_fusion


def test_bm25_equals_the_hand_computed_formula():
    docs = ["cat sat mat", "cat cat dog", "dog bird", "fish"]           # lengths 3, 3, 2, 1; avgdl 2.25
    bm25 = BM25.build(docs, k1=1.2, b=0.75)
    n, avgdl, k1, b = 4, 9 / 4, 1.2, 0.75

    def idf(df):
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def term(tf, length, df):
        return idf(df) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avgdl))

    scores = bm25.scores("cat dog")
    expected = [term(1, 3, 2), term(2, 3, 2) + term(1, 3, 2), term(1, 2, 2), 0.0]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)
    # by hand: idf(2) = ln(1 + 2.5/2.5) = ln 2 ~ 0.6931; doc 1 "cat cat dog" wins
    assert idf(2) == pytest.approx(0.693147, rel=1e-5)
    top_scores, top_ids = bm25.search(["cat dog"], k=2)
    assert top_ids[0].tolist() == [1, 2]   # "dog bird" (shorter) beats "cat sat mat": b at work


def test_b_zero_ignores_length_and_k1_zero_ignores_frequency():
    docs = ["apple", "apple apple banana banana banana"]
    no_length = BM25.build(docs, k1=1.2, b=0.0).scores("banana")
    assert no_length[0] == 0 and no_length[1] > 0
    flat = BM25.build(docs, k1=0.0, b=0.75).scores("apple")
    assert flat[0] == pytest.approx(float(flat[1]))          # tf no longer matters at k1 = 0


def test_terms_are_lowercased_without_stop_words():
    assert bm25_terms("The Cat, and THE dog!") == ["cat", "dog"]


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], k=4, c=60)
    scores = dict(fused)
    assert scores[1] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[3] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[2] == pytest.approx(1 / 62) and scores[4] == pytest.approx(1 / 63)
    assert [doc for doc, _ in fused] == [1, 3, 2, 4]
    assert reciprocal_rank_fusion([[-1, 5]], k=3) == [(5, pytest.approx(1 / 62))]   # -1 = padding


def test_bad_parameters():
    with pytest.raises(UserError, match="k1"):
        BM25.build(["a"], b=1.5)
    with pytest.raises(UserError, match="at least one"):
        BM25.build([])
