"""Vector indexes over unit vectors (cosine = dot product), all behind one interface:

    index = ExactIndex(vectors)                 # [N, d] float32, rows of norm 1
    index = IVFIndex.build(vectors, nlist=100)  # k-means coarse quantizer; index.nprobe lists searched
    index = FaissIndex.build(vectors, "ivf")    # the optional faiss-cpu backend ("flat" or "ivf")
    scores, ids = index.search(queries, k)      # queries [Q, d] -> both [Q, k], best first

Exact: one matmul + topk per block of `block_rows` vectors, merged with a running top-k, so
memory stays at Q x block_rows scores however large N is.

IVF (Jegou et al.'s inverted file, the idea behind faiss.IndexIVFFlat): k-means splits the vectors
into `nlist` cells; a query scores the centroids, then only the vectors of its `nprobe` nearest
cells. Cost ~ nlist + N * nprobe / nlist dot products instead of N; recall falls as nprobe shrinks
(measured against ExactIndex in the benchmark and the RAG report). The vectors are stored sorted
by cell (`offsets[c]:offsets[c+1]` is cell c), so a cell is one contiguous slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..errors import UserError

IndexKind = Literal["exact", "ivf", "faiss", "faiss-ivf"]


class VectorIndex(Protocol):
    kind: str
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def tensors(self) -> dict[str, torch.Tensor]: ...
    def params(self) -> dict: ...
    def __len__(self) -> int: ...


def check_vectors(vectors: torch.Tensor, what: str = "vectors") -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[0] == 0:
        raise UserError(f"{what} must be a non-empty [N, d] tensor, not {getattr(vectors, 'shape', type(vectors))}")
    if not torch.isfinite(vectors).all():
        raise UserError(f"{what} contain NaN or infinite values; check the embedding model's output")
    return vectors.float().contiguous()


def _check_query(queries: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise UserError(f"queries of shape {tuple(queries.shape)} do not match the index's dimension {dim}")
    if k < 1:
        raise UserError(f"k={k} must be 1 or more")
    return queries.float().contiguous()


def merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, ids: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k: the k best of (best so far) + (this block's candidates), per query row."""
    if best is not None:
        scores, ids = torch.cat([best[0], scores], 1), torch.cat([best[1], ids], 1)
    top, where = scores.topk(min(k, scores.shape[1]), dim=1)
    return top, ids.gather(1, where)


class ExactIndex:
    """Brute-force cosine top-k: the reference every approximate index is measured against."""
    kind = "exact"

    def __init__(self, vectors: torch.Tensor, block_rows: int = 262_144) -> None:
        self.vectors = check_vectors(vectors)
        self.block_rows = block_rows

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        queries = _check_query(queries, self.vectors.shape[1], k)
        best = None
        for start in range(0, len(self), self.block_rows):
            block = self.vectors[start:start + self.block_rows]
            scores = queries @ block.T                                       # [Q, b]
            top, where = scores.topk(min(k, block.shape[0]), dim=1)
            best = merge_topk(best, top, where + start, k)
        return best

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.vectors}

    def params(self) -> dict:
        return {}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict) -> "ExactIndex":
        return cls(tensors["vectors"])


def kmeans(vectors: torch.Tensor, n_clusters: int, iters: int = 10, seed: int = 0,
           sample: int = 65_536) -> torch.Tensor:
    """Spherical k-means (cosine): centroids [n_clusters, d] of norm 1, trained on a random sample
    of at most `sample` rows (faiss trains on a sample too: more data barely moves the centroids)."""
    generator = torch.Generator().manual_seed(seed)
    n = vectors.shape[0]
    if not 1 <= n_clusters <= n:
        raise UserError(f"nlist={n_clusters} must be between 1 and the number of vectors ({n})")
    data = vectors[torch.randperm(n, generator=generator)[:sample]] if n > sample else vectors
    centroids = data[torch.randperm(data.shape[0], generator=generator)[:n_clusters]].clone()
    for _ in range(iters):
        assign = assign_cells(data, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=n_clusters)
        empty = counts == 0
        if empty.any():   # re-seed empty cells on random points so every cell is used
            sums[empty] = data[torch.randint(data.shape[0], (int(empty.sum()),), generator=generator)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def assign_cells(vectors: torch.Tensor, centroids: torch.Tensor, block_rows: int = 65_536) -> torch.Tensor:
    """The nearest centroid (largest dot product) of each vector: LongTensor [N]."""
    return torch.cat([(vectors[s:s + block_rows] @ centroids.T).argmax(1) for s in range(0, len(vectors), block_rows)])


class IVFIndex:
    """Inverted-file index from scratch: k-means cells, search only the `nprobe` nearest cells."""
    kind = "ivf"

    def __init__(self, centroids: torch.Tensor, vectors: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                 nprobe: int = 8) -> None:
        self.centroids, self.vectors, self.ids, self.offsets = centroids, vectors, ids, offsets
        self.nprobe = nprobe
        self.candidate_budget = 1 << 18   # vectors gathered at once (x d x 4 bytes of memory)

    @classmethod
    @torch.no_grad()
    def build(cls, vectors: torch.Tensor, nlist: int | None = None, nprobe: int = 8, iters: int = 10,
              seed: int = 0) -> "IVFIndex":
        """nlist default: about sqrt(N) cells (faiss' rule of thumb is 4-16 sqrt(N) for huge N)."""
        vectors = check_vectors(vectors)
        nlist = nlist or max(1, int(round(len(vectors) ** 0.5)))
        centroids = kmeans(vectors, nlist, iters=iters, seed=seed)
        cells = assign_cells(vectors, centroids)
        order = torch.argsort(cells, stable=True)
        offsets = torch.zeros(nlist + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(cells, minlength=nlist).cumsum(0)
        return cls(centroids, vectors[order].contiguous(), order, offsets, nprobe)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, nprobe: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        queries = _check_query(queries, self.vectors.shape[1], k)
        nprobe = min(nprobe or self.nprobe, self.nlist)
        if nprobe < 1:
            raise UserError(f"nprobe={nprobe} must be 1 or more")
        probes = (queries @ self.centroids.T).topk(nprobe, dim=1).indices          # [Q, nprobe]
        sizes = self.offsets[1:] - self.offsets[:-1]
        width = max(1, int(sizes.max()))          # the largest cell: every probed cell is padded to it
        # Queries go in groups so the gathered candidates stay near `candidate_budget` vectors.
        group = max(1, self.candidate_budget // (nprobe * width))
        out_scores, out_ids = [], []
        for start in range(0, len(queries), group):
            q, cells = queries[start:start + group], probes[start:start + group]
            rows = self.offsets[cells][..., None] + torch.arange(width)                # [g, nprobe, width]
            valid = torch.arange(width) < sizes[cells][..., None]
            rows = torch.where(valid, rows, 0).flatten(1)                               # [g, nprobe * width]
            # index_select, not vectors[rows]: advanced indexing takes a much slower path on CPU.
            candidates = self.vectors.index_select(0, rows.flatten()).view(*rows.shape, -1)   # [g, c, d]
            scores = torch.bmm(candidates, q[:, :, None])[..., 0]
            scores = scores.masked_fill(~valid.flatten(1), float("-inf"))
            top, where = scores.topk(min(k, scores.shape[1]), dim=1)
            ids = self.ids.index_select(0, rows.gather(1, where).flatten()).view_as(where)
            out_scores.append(top)
            out_ids.append(torch.where(torch.isfinite(top), ids, -1))   # fewer than k candidates: -1
        return torch.cat(out_scores), torch.cat(out_ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids, "vectors": self.vectors, "ids": self.ids, "offsets": self.offsets}

    def params(self) -> dict:
        return {"nlist": self.nlist, "nprobe": self.nprobe}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict) -> "IVFIndex":
        return cls(tensors["centroids"], tensors["vectors"], tensors["ids"], tensors["offsets"],
                   int(params.get("nprobe", 8)))


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise UserError("the faiss backend needs faiss-cpu; install it with `pip install faiss-cpu` "
                        "or use --index exact / ivf") from None
    return faiss


@dataclass
class FaissIndex:
    """faiss-cpu's IndexFlatIP ("faiss") or IndexIVFFlat ("faiss-ivf"), behind the same interface."""
    index: object
    kind: str = "faiss"
    nprobe: int = 8

    @classmethod
    def build(cls, vectors: torch.Tensor, flavour: Literal["flat", "ivf"] = "flat", nlist: int | None = None,
              nprobe: int = 8) -> "FaissIndex":
        faiss = faiss_module()
        data = check_vectors(vectors).numpy()
        d = data.shape[1]
        if flavour == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            nlist = nlist or max(1, int(round(len(data) ** 0.5)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(data)
            index.nprobe = nprobe
        index.add(data)
        return cls(index, "faiss" if flavour == "flat" else "faiss-ivf", nprobe)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        queries = _check_query(queries, self.index.d, k)
        scores, ids = self.index.search(queries.numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(ids).long()

    def tensors(self) -> dict[str, torch.Tensor]:
        import numpy as np

        return {"faiss": torch.from_numpy(np.array(faiss_module().serialize_index(self.index)))}

    def params(self) -> dict:
        return {"nprobe": self.nprobe}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict, kind: str) -> "FaissIndex":
        index = faiss_module().deserialize_index(tensors["faiss"].numpy())
        if kind == "faiss-ivf":
            index.nprobe = int(params.get("nprobe", 8))
        return cls(index, kind, int(params.get("nprobe", 8)))


def build_vector_index(vectors: torch.Tensor, kind: IndexKind = "exact", nlist: int | None = None,
                       nprobe: int = 8) -> VectorIndex:
    if kind == "exact":
        return ExactIndex(vectors)
    if kind == "ivf":
        return IVFIndex.build(vectors, nlist=nlist, nprobe=nprobe)
    if kind in ("faiss", "faiss-ivf"):
        return FaissIndex.build(vectors, "flat" if kind == "faiss" else "ivf", nlist=nlist, nprobe=nprobe)
    raise UserError(f"unknown index kind '{kind}'; use one of exact, ivf, faiss, faiss-ivf")


def vector_index_from_tensors(kind: str, tensors: dict[str, torch.Tensor], params: dict) -> VectorIndex:
    if kind == "exact":
        return ExactIndex.from_tensors(tensors, params)
    if kind == "ivf":
        return IVFIndex.from_tensors(tensors, params)
    if kind in ("faiss", "faiss-ivf"):
        return FaissIndex.from_tensors(tensors, params, kind)
    raise UserError(f"the index records an unknown kind '{kind}'; rebuild it with `lmforge rag index`")
