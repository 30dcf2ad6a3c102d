"""The RAG index on disk: round trip, fingerprint refusal, atomic replacement, bad input; chunking,
the QA set, prompts with citations, and the CLI's errors."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import UserError
from lmforge.rag import build_index, load_index
from lmforge.rag.corpus import RagDocument, chunk_documents, load_documents
from lmforge.rag.evaluate import build_qa, is_correct, retrieval_metrics
from lmforge.rag.generate import RagChat, cited, rag_prompt, strip_sources, SOURCES_MARK
from lmforge.rag import store
from rag_helpers import TEXTS, minilm_tokenizer, tiny_chunks, tiny_embedder


@pytest.fixture(scope="module")
def embedder():
    return tiny_embedder(0)


@pytest.mark.parametrize("kind", ["exact", "ivf", "faiss"])
def test_round_trip_gives_the_same_results(tmp_path, embedder, kind):
    if kind == "faiss":
        pytest.importorskip("faiss")
    index = build_index(tiny_chunks(), embedder, "hybrid", kind, nlist=2, nprobe=2)
    before = {r: index.search("capital of France", 3, r) for r in ("dense", "bm25", "hybrid")}
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx", embedder=embedder)
    for retriever, passages in before.items():
        after = loaded.search("capital of France", 3, retriever)
        assert [p.chunk_id for p in after] == [p.chunk_id for p in passages]
        assert [p.score for p in after] == pytest.approx([p.score for p in passages], abs=1e-5)
    assert loaded.search("capital of France", 1, "bm25")[0].title == "Paris"
    assert loaded.manifest["embedder"]["fingerprint"] == embedder.fingerprint()


def test_a_query_with_another_model_is_refused(tmp_path, embedder):
    build_index(tiny_chunks(), embedder, "dense").save(tmp_path / "idx")
    with pytest.raises(UserError, match="fingerprint"):
        load_index(tmp_path / "idx", embedder=tiny_embedder(seed=1, name="other"))
    index = load_index(tmp_path / "idx")
    with pytest.raises(UserError, match="fingerprint"):
        index.use_embedder(tiny_embedder(seed=2))
    index.use_embedder(tiny_embedder(seed=0))     # the same weights are accepted
    assert len(index.search("violin", 2)) == 2


def test_save_is_atomic_and_replaces_the_old_generation(tmp_path, embedder, monkeypatch):
    target = tmp_path / "idx"
    first = build_index(tiny_chunks()[:3], embedder, "hybrid")
    first.save(target)
    files_before = sorted(p.name for p in target.iterdir())

    second = build_index(tiny_chunks(), embedder, "hybrid")
    calls = {"n": 0}
    real = store.write_json_atomic

    def crash_on_manifest(path, obj, indent=2):
        calls["n"] += 1
        if str(path).endswith("index.json"):
            raise KeyboardInterrupt("killed before the commit point")
        return real(path, obj, indent=indent)

    monkeypatch.setattr(store, "write_json_atomic", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        second.save(target)
    monkeypatch.undo()
    # The old index is still whole (its manifest and checksummed files), whatever was written after.
    assert len(load_index(target, embedder=embedder)) == 3
    second.save(target)
    assert len(load_index(target, embedder=embedder)) == 5
    names = sorted(p.name for p in target.iterdir())
    manifest = json.loads((target / "index.json").read_text())
    live = {entry["name"] for entry in manifest["files"].values()} | {"index.json"}
    assert not set(files_before) - {"index.json"} & set(names)   # the first generation is deleted
    assert live <= set(names) and not any(name.endswith(".tmp") for name in names)


def test_load_refuses_missing_corrupt_and_foreign_directories(tmp_path, embedder):
    with pytest.raises(UserError, match="not a RAG index"):
        load_index(tmp_path)
    build_index(tiny_chunks(), embedder, "dense").save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    chunks = tmp_path / "idx" / manifest["files"]["chunks"]["name"]
    chunks.write_text(chunks.read_text().replace("Paris", "Rome"))
    with pytest.raises(UserError, match="checksum"):
        load_index(tmp_path / "idx")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a RAG index"):
        build_index(tiny_chunks(), embedder, "dense").save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_bm25_only_index_needs_no_embedder(tmp_path):
    build_index(tiny_chunks(), None, "bm25").save(tmp_path / "idx")
    index = load_index(tmp_path / "idx")
    assert index.search("programming language", 1)[0].title == "Python"
    with pytest.raises(UserError, match="no vectors"):
        index.search("programming language", 1, "dense")


def test_search_input_errors(embedder):
    index = build_index(tiny_chunks(), embedder, "hybrid")
    with pytest.raises(UserError, match="empty"):
        index.search("   ", 3)
    with pytest.raises(UserError, match="unknown retriever"):
        index.search("paris", 3, "splade")
    with pytest.raises(UserError, match="k=0"):
        index.search("paris", 0)
    with pytest.raises(UserError, match="no chunks"):
        build_index([], embedder)


def test_chunking_by_tokens_with_overlap_keeps_title_and_source():
    tokenizer = minilm_tokenizer()
    words = " ".join(f"word{i}" for i in range(120))
    doc = RagDocument("Long", words, "test:Long")
    chunks = chunk_documents([doc, RagDocument("Short", "tiny text", "test:Short")], tokenizer, 32, 8)
    assert {c.title for c in chunks} == {"Long", "Short"} and chunks[-1].text == "tiny text"
    long = [c for c in chunks if c.title == "Long"]
    assert len(long) > 3 and all(c.source == "test:Long" for c in long)
    assert all(len(tokenizer.encode(c.text)) <= 32 for c in long)
    first, second = long[0].text.split(), long[1].text.split()
    assert set(first) & set(second)                      # the overlap is shared
    assert long[-1].text.split()[-1] == "word119"        # nothing is lost at the end
    with pytest.raises(UserError, match="overlap"):
        chunk_documents([doc], tokenizer, 32, 32)


def test_user_corpus_from_jsonl(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS.values()) + "\n")
    docs = load_documents(str(path))
    assert len(docs) == 5 and docs[0].source.startswith("notes.jsonl") and docs[0].text.startswith("Paris")
    with pytest.raises(UserError):
        load_documents(str(tmp_path / "missing.jsonl"))


def test_wiki_corpus_and_the_held_out_qa_set():
    docs = load_documents("wiki")
    assert len(docs) > 9000 and all(d.text for d in docs[:100])
    qa = build_qa(docs, 50, seed=0)
    assert len(qa) == 50 and qa == build_qa(docs, 50, seed=0)
    by_source = {d.source: d for d in docs}
    for item in qa:
        doc = by_source[item.source]
        assert item.answer == doc.title and doc.description.rstrip(".") in item.question
        assert not is_correct(item.question, item.answer)     # the answer is never in the question


def test_recall_and_mrr_count_ranks(embedder):
    index = build_index(tiny_chunks(), embedder, "hybrid")
    from lmforge.rag.evaluate import QAItem

    qa = [QAItem("programming language readable code", "Python", "test:Python"),
          QAItem("string instrument bow", "Violin", "test:Violin")]
    metrics = retrieval_metrics(index, qa, "bm25", ks=(1, 3))
    assert metrics["recall@1"] == 1.0 and metrics["mrr@3"] == 1.0


def test_prompt_numbers_passages_and_chat_augments_the_last_user_turn(embedder):
    index = build_index(tiny_chunks(), embedder, "bm25")
    rag = RagChat(index, k=2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi" + SOURCES_MARK + "\n[1] x"},
                {"role": "user", "content": "What is the capital of Germany?"}]
    augmented, passages = rag.augment(strip_sources(messages))
    assert augmented[:2] == messages[:2] and augmented[2]["content"] == "hi"
    assert "[1] Berlin:" in augmented[3]["content"] and augmented[3]["content"].endswith(
        "Question: What is the capital of Germany?")
    assert messages[3]["content"] == "What is the capital of Germany?"      # the caller's list is untouched
    assert len(passages) == 2 and passages[0].title == "Berlin"
    assert cited("Berlin [1], see also [2] and [7]", 2) == [1, 2]
    assert rag_prompt("q", []) == "q"


def test_cli_errors_exit_2(tmp_path, capsys):
    from lmforge.cli import main

    assert main(["rag", "ask", "--index", str(tmp_path), "q", "--search-only"]) == 2
    assert "not a RAG index" in capsys.readouterr().err
    assert main(["rag", "index", "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
