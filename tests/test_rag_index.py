"""Vector indexes: exact top-k equals brute force; our IVF's recall; faiss behind the same interface."""
from __future__ import annotations

import pytest
import torch

from lmforge.errors import UserError
from lmforge.rag.index import ExactIndex, FaissIndex, IVFIndex, build_vector_index, kmeans


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def clustered(n: int, d: int = 32, clusters: int = 20, seed: int = 0) -> torch.Tensor:
    """Unit vectors around `clusters` centres: real embeddings have such structure, uniform noise does not."""
    g = torch.Generator().manual_seed(seed)
    centres = unit(torch.randn(clusters, d, generator=g))
    return unit(centres[torch.randint(clusters, (n,), generator=g)] + 0.15 * torch.randn(n, d, generator=g))


def test_exact_top_k_equals_brute_force_across_blocks():
    vectors, queries = unit(torch.randn(1000, 16)), unit(torch.randn(7, 16))
    scores, ids = ExactIndex(vectors, block_rows=128).search(queries, 10)   # 8 blocks merged
    brute = queries @ vectors.T
    expected_scores, expected_ids = brute.topk(10, dim=1)
    assert torch.equal(ids, expected_ids)
    assert torch.allclose(scores, expected_scores)


def test_exact_k_larger_than_n_returns_everything():
    scores, ids = ExactIndex(unit(torch.randn(3, 4))).search(unit(torch.randn(1, 4)), 10)
    assert ids.shape == (1, 3) and sorted(ids[0].tolist()) == [0, 1, 2]


def test_ivf_recall_against_exact():
    vectors = clustered(4000)
    queries = unit(vectors[:200] + 0.1 * torch.randn(200, 32, generator=torch.Generator().manual_seed(1)))
    exact = ExactIndex(vectors).search(queries, 10)[1]
    ivf = IVFIndex.build(vectors, nlist=64)
    assert ivf.offsets[-1] == 4000 and sorted(ivf.ids.tolist()) == list(range(4000))

    def recall(nprobe: int) -> float:
        found = ivf.search(queries, 10, nprobe=nprobe)[1]
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)) / exact.numel()

    assert recall(16) >= 0.95
    assert recall(1) < recall(16)                       # fewer cells searched, fewer neighbours found
    assert recall(ivf.nlist) == 1.0                     # every cell probed = exact search


def test_kmeans_centroids_are_unit_and_cells_nonempty():
    vectors = clustered(500, clusters=5)
    centroids = kmeans(vectors, 5, iters=15)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(5), atol=1e-5)
    with pytest.raises(UserError, match="nlist"):
        kmeans(vectors, 501)


def test_faiss_backend_matches_exact():
    pytest.importorskip("faiss")
    vectors, queries = clustered(2000), unit(torch.randn(5, 32))
    exact_scores, exact_ids = ExactIndex(vectors).search(queries, 5)
    flat_scores, flat_ids = FaissIndex.build(vectors, "flat").search(queries, 5)
    assert torch.equal(flat_ids, exact_ids) and torch.allclose(flat_scores, exact_scores, atol=1e-5)
    ivf = build_vector_index(vectors, "faiss-ivf", nlist=32, nprobe=32)
    assert torch.equal(ivf.search(queries, 5)[1], exact_ids)


def test_bad_vectors_and_queries_are_user_errors():
    with pytest.raises(UserError, match="NaN"):
        ExactIndex(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(UserError, match="non-empty"):
        ExactIndex(torch.zeros(0, 4))
    index = ExactIndex(unit(torch.randn(10, 4)))
    with pytest.raises(UserError, match="dimension"):
        index.search(torch.randn(1, 5), 3)
    with pytest.raises(UserError, match="k=0"):
        index.search(torch.randn(1, 4), 0)
    with pytest.raises(UserError, match="unknown index kind"):
        build_vector_index(torch.randn(4, 4), "hnsw")
