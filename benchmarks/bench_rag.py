"""RAG benchmark: embedding throughput vs sentence-transformers; query latency of our exact and IVF
indexes vs faiss' flat and IVF indexes on synthetic vectors (dim 384), at 10k and 1M.

  embed   the same wiki chunks through lmforge's BERT (rag/embed.py) and through
          sentence-transformers' all-MiniLM-L6-v2, both batch 64, fp32, same threads; the vectors
          are compared too (max |difference|).
  search  unit vectors from a mixture of Gaussians (real sentence embeddings cluster; uniform noise
          in 384-d has no near neighbours and no index can beat a scan on it). Queries are fresh
          draws from the same mixture, not in the index. Latency = median over single queries
          (batch 1, what a chat turn does) and ms/query over a batch of 64. Recall@10 of the IVF
          indexes against exact top-10, for each nprobe; nlist = sqrt(N) for both IVF indexes.

Targets (issue 13): exact within 2x of faiss flat; IVF recall@10 >= 0.95. Ends with one JSON line.

    python benchmarks/bench_rag.py [--sizes 10000,1000000] [--texts 256] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def machine() -> dict:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"cpu": name, "avx512f": "avx512f" in flags, "avx2": "avx2" in flags, "torch": torch.__version__,
            "cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}


def bench_embed(n_texts: int, rounds: int = 3) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from lmforge.assets import minilm_dir
    from lmforge.rag.corpus import chunk_documents, load_documents
    from lmforge.rag.embed import Embedder
    from lmforge.rag.store import passage_text

    ours = Embedder.load("minilm-l6", batch_size=64)
    docs = load_documents("wiki")[:: max(1, 10_000 // n_texts)][:n_texts]
    texts = [passage_text(c) for c in chunk_documents(docs, ours.tokenizer)][:n_texts]
    tokens = sum(len(ours.token_ids(t)) for t in texts)
    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    ours.encode(texts[:8]), reference.encode(texts[:8])          # warm-up
    ours_s = theirs_s = float("inf")
    for _ in range(rounds):   # interleaved, best of each: a shared machine's load drifts between runs
        start = time.perf_counter()
        mine = ours.encode(texts)
        ours_s = min(ours_s, time.perf_counter() - start)
        start = time.perf_counter()
        theirs = torch.from_numpy(reference.encode(texts, batch_size=64))
        theirs_s = min(theirs_s, time.perf_counter() - start)
    return {"texts": len(texts), "tokens": tokens, "texts_per_s_lmforge": len(texts) / ours_s,
            "texts_per_s_st": len(texts) / theirs_s, "max_abs_diff": float((mine - theirs).abs().max())}


def mixture(n: int, d: int, seed: int, centres) -> "torch.Tensor":
    import torch

    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(centres), (n,), generator=g)
    out = torch.empty(n, d)
    for start in range(0, n, 100_000):   # in blocks: the noise for 1M x 384 at once would double the peak
        rows = which[start:start + 100_000]
        out[start:start + len(rows)] = torch.nn.functional.normalize(
            centres[rows] + 0.06 * torch.randn(len(rows), d, generator=g), dim=1)
    return out


def latency(search, queries, k: int = 10) -> tuple[float, float]:
    """(median ms for one query, ms/query in one batch of all queries)."""
    search(queries[:1], k)
    singles = []
    for q in queries[:32]:
        start = time.perf_counter()
        search(q[None], k)
        singles.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    search(queries, k)
    return statistics.median(singles), (time.perf_counter() - start) * 1000 / len(queries)


def recall(found, exact) -> float:
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)) / exact.numel()


def bench_search(n: int, d: int = 384, n_queries: int = 64, nprobes=(1, 2, 4, 8, 16, 32, 64)) -> dict:
    import faiss
    import torch

    from lmforge.rag.index import ExactIndex, FaissIndex, IVFIndex

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(max(50, n // 500), d, generator=g) / d ** 0.5   # centre norm ~1, noise norm ~1.2
    vectors, queries = mixture(n, d, 1, centres), mixture(n_queries, d, 2, centres)
    row: dict = {"n": n, "d": d}
    exact = ExactIndex(vectors)
    truth = exact.search(queries, 10)[1]
    row["exact_ms"], row["exact_batch_ms"] = latency(exact.search, queries)
    flat = FaissIndex.build(vectors, "flat")
    row["faiss_flat_ms"], row["faiss_flat_batch_ms"] = latency(flat.search, queries)
    row["exact_equals_faiss_flat"] = recall(flat.search(queries, 10)[1], truth)
    del flat
    nlist = int(round(n ** 0.5))
    start = time.perf_counter()
    ivf = IVFIndex.build(vectors, nlist=nlist)
    row["ivf_build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    fivf = FaissIndex.build(vectors, "ivf", nlist=nlist)
    row["faiss_ivf_build_s"] = time.perf_counter() - start
    del exact, vectors
    row["nlist"], row["ivf"], row["faiss_ivf"] = nlist, [], []
    for nprobe in nprobes:
        if nprobe > nlist:
            break
        ours = lambda q, k, p=nprobe: ivf.search(q, k, nprobe=p)   # noqa: E731
        fivf.index.nprobe = nprobe
        single, batch = latency(ours, queries)
        row["ivf"].append({"nprobe": nprobe, "recall@10": recall(ours(queries, 10)[1], truth), "ms": single,
                           "batch_ms": batch})
        single, batch = latency(fivf.search, queries)
        row["faiss_ivf"].append({"nprobe": nprobe, "recall@10": recall(fivf.search(queries, 10)[1], truth),
                                 "ms": single, "batch_ms": batch})
    return row


def first_at(rows: list[dict], target: float = 0.95) -> dict | None:
    return next((r for r in rows if r["recall@10"] >= target), None)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    host = machine()
    print(f"machine: {host['cpu']}, {host['cores']} cores, {args.threads} threads, load average "
          f"{host['load_average']} (a shared machine inflates every figure; ratios are fairer)")

    embed = bench_embed(args.texts)
    print(f"\nembedding {embed['texts']} wiki chunks ({embed['tokens']:,} tokens), batch 64")
    print(f"  lmforge BERT           {embed['texts_per_s_lmforge']:8.1f} texts/s")
    print(f"  sentence-transformers  {embed['texts_per_s_st']:8.1f} texts/s   (max |diff| {embed['max_abs_diff']:.1e})")

    figures = {"bench": "rag", **host, "threads": args.threads, "embed_texts": embed["texts"],
               "embed_texts_per_s_lmforge": round(embed["texts_per_s_lmforge"], 2),
               "embed_texts_per_s_st": round(embed["texts_per_s_st"], 2),
               "embed_ratio_lmforge_over_st": round(embed["texts_per_s_lmforge"] / embed["texts_per_s_st"], 3),
               "embed_max_abs_diff": embed["max_abs_diff"]}
    for n in [int(s) for s in args.sizes.split(",")]:
        row = bench_search(n)
        print(f"\nsearch, N={n:,} x {row['d']} (synthetic mixture), top-10; ms: one query / per query in a batch of 64")
        print(f"  exact (ours)      {row['exact_ms']:8.2f} / {row['exact_batch_ms']:7.3f}")
        print(f"  faiss IndexFlatIP {row['faiss_flat_ms']:8.2f} / {row['faiss_flat_batch_ms']:7.3f}   "
              f"(same top-10: {row['exact_equals_faiss_flat']:.3f})")
        print(f"  IVF nlist={row['nlist']}: build ours {row['ivf_build_s']:.1f}s, faiss {row['faiss_ivf_build_s']:.1f}s")
        print(f"  {'nprobe':>6} {'ours recall':>12} {'ours ms':>8} {'faiss recall':>13} {'faiss ms':>9}")
        for a, b in zip(row["ivf"], row["faiss_ivf"]):
            print(f"  {a['nprobe']:>6} {a['recall@10']:>12.3f} {a['ms']:>8.2f} {b['recall@10']:>13.3f} {b['ms']:>9.2f}")
        ours95, faiss95 = first_at(row["ivf"]), first_at(row["faiss_ivf"])
        tag = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m"
        figures.update({
            f"exact_ms_{tag}": round(row["exact_ms"], 3), f"faiss_flat_ms_{tag}": round(row["faiss_flat_ms"], 3),
            f"exact_over_faiss_flat_{tag}": round(row["exact_ms"] / row["faiss_flat_ms"], 3),
            f"exact_over_faiss_flat_batch_{tag}": round(row["exact_batch_ms"] / row["faiss_flat_batch_ms"], 3),
            f"ivf_nlist_{tag}": row["nlist"],
            f"ivf_nprobe_at_095_{tag}": ours95 and ours95["nprobe"],
            f"ivf_recall10_at_nprobe_{tag}": ours95 and round(ours95["recall@10"], 4),
            f"ivf_ms_at_095_{tag}": ours95 and round(ours95["ms"], 3),
            f"faiss_ivf_ms_at_095_{tag}": faiss95 and round(faiss95["ms"], 3),
            f"ivf_best_recall10_{tag}": round(max(r["recall@10"] for r in row["ivf"]), 4),
        })
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
