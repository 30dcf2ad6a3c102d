"""`lmforge rag`: index a corpus, ask questions with citations, evaluate retrieval and answers."""
from __future__ import annotations

import argparse
import json
import sys

from ..cli import add_subparser
from ..errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    from ..cli import HelpFormatter

    parser.description = "Retrieval-augmented generation: index a corpus, ask with citations, evaluate."
    parser.formatter_class = HelpFormatter
    subparsers = parser.add_subparsers(dest="action", required=True)

    index = add_subparser(subparsers, "index", "chunk and embed a corpus into a searchable index directory",
                          "lmforge rag index --corpus wiki --out runs/wiki-index --retriever hybrid --index exact")
    index.add_argument("--corpus", required=True, help="'wiki' (10k Wikipedia leads) or a .txt/.jsonl/.parquet file or directory")
    index.add_argument("--out", required=True, metavar="DIR", help="index directory (replaced atomically if it is one)")
    index.add_argument("--retriever", choices=["dense", "bm25", "hybrid"], default="hybrid",
                       help="what to build; hybrid = dense + BM25, fused by reciprocal rank")
    index.add_argument("--index", choices=["exact", "ivf", "faiss", "faiss-ivf"], default="exact",
                       help="vector index: exact top-k, our IVF, or faiss-cpu's flat / IVF")
    index.add_argument("--nlist", type=int, default=None, help="IVF cells (default about sqrt(N))")
    index.add_argument("--nprobe", type=int, default=8, help="IVF cells searched per query")
    index.add_argument("--chunk-tokens", type=int, default=128)
    index.add_argument("--overlap", type=int, default=32)
    index.add_argument("--limit", type=int, default=None, help="index only the first N documents")
    index.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    index.add_argument("--embedder", default="minilm-l6", help="a BERT encoder (default: bundled all-MiniLM-L6-v2)")
    index.set_defaults(func=run_index)

    ask = add_subparser(subparsers, "ask", "retrieve passages for a question and answer it, citing them",
                        'lmforge rag ask --index runs/wiki-index "Who painted the Mona Lisa?"')
    ask.add_argument("question")
    ask.add_argument("--index", required=True, metavar="DIR")
    ask.add_argument("--model", default="smollm2-135m-instruct", metavar="REF", help="the chat model that answers")
    ask.add_argument("--k", type=int, default=3, help="passages put in the prompt")
    ask.add_argument("--retriever", choices=["dense", "bm25", "hybrid"], default=None, help="default: the index's")
    ask.add_argument("--search-only", action="store_true", help="print the passages, do not generate")
    ask.add_argument("--max-new-tokens", type=int, default=96)
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.set_defaults(func=run_ask)

    evaluate = add_subparser(subparsers, "eval", "recall@k / MRR per retriever, and closed-book vs RAG accuracy",
                             "lmforge rag eval --index runs/wiki-index --questions 200 --answers 40")
    evaluate.add_argument("--index", required=True, metavar="DIR")
    evaluate.add_argument("--qa", default=None, metavar="FILE",
                          help="JSONL of {question, answer, source}; default: built from the wiki corpus")
    evaluate.add_argument("--questions", type=int, default=200, help="held-out questions for retrieval")
    evaluate.add_argument("--answers", type=int, default=0, help="also answer this many with --model (0 = skip)")
    evaluate.add_argument("--model", default="smollm2-135m-instruct", metavar="REF")
    evaluate.add_argument("--k", type=int, default=3)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", default=None, metavar="FILE", help="write the results as JSON here")
    evaluate.set_defaults(func=run_eval)

    report = add_subparser(subparsers, "report", "the RAG recipe: index, evaluate, write report.md + rag.png",
                           "lmforge rag report --config rag-wiki --out runs/rag-report n_docs=1000")
    report.add_argument("--config", default="rag-wiki", help="recipe name in configs/ or a YAML path")
    report.add_argument("--out", required=True, metavar="DIR")
    report.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    report.set_defaults(func=run_report)


def run_index(args: argparse.Namespace) -> int:
    import time

    from .corpus import WIKI_LICENSE, chunk_documents, load_documents
    from .embed import Embedder
    from .store import build_index

    start = time.perf_counter()
    docs = load_documents(args.corpus, text_field=args.text_field, limit=args.limit)
    embedder = Embedder.load(args.embedder)
    chunks = chunk_documents(docs, embedder.tokenizer, args.chunk_tokens, args.overlap)
    print(f"{len(docs):,} documents -> {len(chunks):,} chunks; embedding ...", file=sys.stderr, flush=True)
    corpus = {"name": args.corpus, "documents": len(docs), "chunk_tokens": args.chunk_tokens, "overlap": args.overlap}
    if args.corpus == "wiki":
        corpus["license"] = WIKI_LICENSE
    index = build_index(chunks, embedder if args.retriever != "bm25" else None, args.retriever, args.index,
                        nlist=args.nlist, nprobe=args.nprobe, corpus=corpus)
    index.save(args.out)
    print(f"indexed {len(chunks):,} chunks ({args.retriever}, {args.index}) in {time.perf_counter() - start:.0f}s "
          f"-> {args.out}")
    return 0


def run_ask(args: argparse.Namespace) -> int:
    from .store import load_index

    index = load_index(args.index)
    if args.search_only:
        passages = index.search(args.question, args.k, args.retriever)
        answer = None
    else:
        from ..infer.engine import Engine
        from ..infer.sampling import SamplingParams
        from ..model.loading import load
        from .generate import ask

        engine = Engine(*load(args.model), max_batch_size=1)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0).validate()
        result = ask(engine, index, args.question, params, args.k, args.retriever)
        passages, answer = result.passages, result.answer
    if args.json:
        print(json.dumps({"question": args.question, "answer": answer,
                          "passages": [p.__dict__ for p in passages]}, ensure_ascii=False))
        return 0
    if answer is not None:
        print(answer.strip(), "\n")
    for i, p in enumerate(passages, start=1):
        print(f"[{i}] {p.title} ({p.source}, score {p.score:.3f})\n    {p.text[:300]}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .corpus import load_documents
    from .evaluate import answer_accuracy, build_qa, evaluate_retrieval, read_qa
    from .store import load_index

    index = load_index(args.index)
    if args.qa:
        qa = read_qa(args.qa)[: args.questions]
    elif index.manifest.get("corpus", {}).get("name") == "wiki":
        indexed = {chunk.source for chunk in index.chunks}
        qa = build_qa([d for d in load_documents("wiki") if d.source in indexed], args.questions, args.seed)
    else:
        raise UserError("this index is not of the wiki corpus, so no QA set can be built for it; "
                        "give --qa FILE.jsonl with {question, answer, source} lines")
    results: dict = {"questions": len(qa), "retrieval": evaluate_retrieval(index, qa)}
    print(f"{len(qa)} questions")
    print(f"{'retriever':<8} " + " ".join(f"{k:>10}" for k in ("recall@1", "recall@5", "recall@10", "mrr@20")))
    for name, m in results["retrieval"].items():
        print(f"{name:<8} " + " ".join(f"{m[k]:>10.3f}" for k in ("recall@1", "recall@5", "recall@10", "mrr@20")))
    if args.answers:
        from ..infer.engine import Engine
        from ..infer.sampling import SamplingParams
        from ..model.loading import load

        engine = Engine(*load(args.model), max_batch_size=16)
        params = SamplingParams(max_new_tokens=24, temperature=0.0).validate()
        answers = answer_accuracy(engine, index, qa[: args.answers], params, args.k, index.retriever)
        results["answers"] = answers
        print(f"answers ({answers['n']}): closed-book {answers['closed_book_accuracy']:.3f}, "
              f"RAG {answers['rag_accuracy']:.3f} (gold passage in context {answers['gold_in_context']:.3f})")
    if args.out:
        from ..io import write_json_atomic

        write_json_atomic(args.out, results)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..config import build_config, save_config
    from .report import RagReportConfig, run_report as run

    config = build_config(RagReportConfig, args.config, args.overrides)
    directory = run(config, args.out)
    save_config(config, directory / "config.yaml")
    print(f"report -> {directory / 'report.md'}")
    return 0
