"""Corpus readers: text files and directories, separators, JSONL, Parquet, `datasets`; their errors."""
from __future__ import annotations

import pytest

from lmforge.data import corpora
from lmforge.data.corpora import open_corpus
from lmforge.data.shards import choose_val_documents
from lmforge.errors import UserError


def texts(corpus) -> list[str]:
    return [document.text for document in corpus.documents()]


def test_directory_is_one_document_per_file_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("nested", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")  # blank documents are skipped
    (tmp_path / "notes.bin").write_bytes(b"\x00\x01")  # unknown suffixes are not corpus files
    corpus = open_corpus(tmp_path)
    assert [d.name for d in corpus.documents()] == ["a.txt", "b.txt", "sub/c.txt"]
    assert texts(corpus) == ["first file\n", "second file\n", "nested"]
    assert texts(corpus) == texts(corpus)  # re-iterable


def test_separator_splits_a_file_even_across_read_blocks(tmp_path, monkeypatch):
    parts = [f"document {i} " + "word " * (i * 3) for i in range(12)]
    file = tmp_path / "corpus.txt"
    file.write_text("\n\n".join(parts) + "\n\n", encoding="utf-8")
    # Tiny blocks force separators to straddle block boundaries.
    for block in (1, 2, 3, 7, 1 << 20):
        monkeypatch.setattr(corpora, "READ_BLOCK_CHARS", block)
        corpus = open_corpus(file, separator="\n\n")
        assert texts(corpus) == parts, f"block size {block}"
    assert [d.name for d in corpus.documents()][:2] == ["corpus.txt#0", "corpus.txt#1"]


def test_jsonl_reads_the_text_field_and_skips_blank_lines(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "alpha", "id": 1}\n\n{"text": "beta"}\n{"body": "x", "text": null}\n', encoding="utf-8")
    corpus = open_corpus(file)
    assert texts(corpus) == ["alpha", "beta"]
    assert [d.name for d in corpus.documents()] == ["data.jsonl:1", "data.jsonl:3"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": "broken\n{"text": "never read"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl' line 3 is not valid JSON"):
        texts(open_corpus(file))


def test_jsonl_missing_field_lists_the_fields(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "a"}\n{"content": "b", "id": 2}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2 has no 'text' field \(found: content, id\).*--text-field"):
        texts(open_corpus(file))
    file.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1: field 'text' is a int"):
        texts(open_corpus(file))


def test_parquet_column_and_its_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": ["one", None, "three"], "n": [1, 2, 3]}), file)
    corpus = open_corpus(file, text_field="content")
    assert texts(corpus) == ["one", "three"]
    assert [d.name for d in corpus.documents()] == ["data.parquet[0]", "data.parquet[2]"]
    with pytest.raises(UserError, match=r"no column 'text' \(columns: content, n\).*--text-column"):
        texts(open_corpus(file))
    with pytest.raises(UserError, match=r"column 'n' .* not strings"):
        texts(open_corpus(file, text_field="n"))


def test_mixed_directory_reads_each_file_with_its_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("from text", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "from jsonl"}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "c.parquet")
    corpus = open_corpus(tmp_path)
    assert texts(corpus) == ["from text", "from jsonl", "from parquet"]
    assert corpus.source["kind"] == "jsonl+parquet+text"


def test_saved_dataset_directory_and_split(tmp_path):
    import datasets

    rows = {"text": ["first row", "second row", "third row"], "label": [0, 1, 0]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    assert texts(open_corpus(tmp_path / "single")) == rows["text"]

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                   "test": datasets.Dataset.from_dict({"text": ["held"], "label": [1]})})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert texts(open_corpus(tmp_path / "dict", dataset_split="test")) == ["held"]
    with pytest.raises(UserError, match=r"no split 'valid' \(splits: train, test\)"):
        open_corpus(tmp_path / "dict", dataset_split="valid")
    with pytest.raises(UserError, match=r"no column 'body' \(columns: text, label\)"):
        open_corpus(tmp_path / "single", text_field="body")


def test_dataset_name_from_the_local_cache(tmp_path, monkeypatch):
    import datasets
    from datasets.packaged_modules.json.json import Json

    # Put a dataset in an offline cache the way `load_dataset("tiny_corpus")` would have left it.
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    source = tmp_path / "rows.jsonl"
    source.write_text('{"text": "cached one"}\n{"text": "cached two"}\n', encoding="utf-8")
    builder = Json(data_files={"train": str(source)}, dataset_name="tiny_corpus", config_name="default",
                   hash="0123abcd", cache_dir=str(cache))
    builder.download_and_prepare()
    built = next((cache / "tiny_corpus").glob("default-*"))
    built.rename(built.with_name("default"))  # the cache layout of a dataset with no extra config

    monkeypatch.chdir(tmp_path)
    corpus = open_corpus("tiny_corpus")
    assert texts(corpus) == ["cached one", "cached two"]
    assert corpus.source == {"kind": "dataset", "name": "tiny_corpus", "split": "train", "text_field": "text",
                             "rows": 2}
    with pytest.raises(UserError, match=r"corpus 'missing_corpus' is not a file, a directory or a dataset"):
        open_corpus("missing_corpus")


def test_missing_paths_and_empty_directories(tmp_path):
    with pytest.raises(UserError, match=r"corpus '.*nope\.txt' does not exist"):
        open_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no \.txt, \.jsonl or \.parquet files \(an empty corpus\)"):
        open_corpus(tmp_path / "empty")
    with pytest.raises(UserError, match=r"--separator is empty"):
        open_corpus(tmp_path, separator="")


def test_non_utf8_text_names_the_file(tmp_path):
    file = tmp_path / "latin1.txt"
    file.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt' is not UTF-8 text"):
        texts(open_corpus(file))


def test_shakespeare_is_one_document_per_play():
    corpus = open_corpus("shakespeare")
    names = [document.name for document in corpus.documents()]
    assert len(names) == 42 and "hamlet" in names and names == sorted(names)
    held_out = [names[i] for i in choose_val_documents(len(names), 0.05, "shakespeare")]
    assert held_out == ["henry_vi_part_1", "richard_iii"]  # fixed: whole plays, the same on every run


def test_val_choice_is_spread_deterministic_and_leaves_training_data():
    assert choose_val_documents(10, 0.2, "c") == [2, 7]
    assert choose_val_documents(3, 0.01, "c") == [1]  # at least one held out
    assert choose_val_documents(2, 0.9, "c") == [1]  # at least one left for training
    picked = choose_val_documents(1000, 0.05, "c")
    assert len(picked) == 50 and len(set(picked)) == 50 and max(picked) < 1000
    with pytest.raises(UserError, match="is empty"):
        choose_val_documents(0, 0.05, "c")
    with pytest.raises(UserError, match="single document.*--separator"):
        choose_val_documents(1, 0.05, "c")
    with pytest.raises(UserError, match=r"--val-fraction 1.0 is outside \(0, 1\)"):
        choose_val_documents(10, 1.0, "c")


def test_parquet_dictionary_encoded_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp_path / "category.parquet"
    text = pa.array(["one", None, "two", "one"]).dictionary_encode()  # pandas' "category" dtype
    pq.write_table(pa.table({"text": text, "n": pa.array([1, 2, 1, 1]).dictionary_encode()}), file)
    assert pa.types.is_dictionary(pq.ParquetFile(file).schema_arrow.field("text").type)
    assert texts(open_corpus(file)) == ["one", "two", "one"]
    with pytest.raises(UserError, match=r"column 'n' .* not strings"):
        texts(open_corpus(file, text_field="n"))


@pytest.mark.parametrize("damage", ["info-truncated", "info-a-list", "state-missing", "arrow-garbage"])
def test_a_broken_saved_dataset_directory_is_a_user_error(tmp_path, damage):
    import datasets

    directory = tmp_path / "dataset"
    datasets.Dataset.from_dict({"text": ["one document", "another one"]}).save_to_disk(str(directory))
    if damage == "info-truncated":
        (directory / "dataset_info.json").write_text('{"features": ', encoding="utf-8")
    elif damage == "info-a-list":
        (directory / "dataset_info.json").write_text("[]", encoding="utf-8")
    elif damage == "state-missing":
        (directory / "state.json").unlink()
    else:
        next(directory.glob("*.arrow")).write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"dataset.*(cannot be loaded|cannot be read)"):
        texts(open_corpus(directory))


def test_jsonl_nested_too_deeply_names_the_line(tmp_path):
    (tmp_path / "deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"deep.jsonl' line 2 cannot be read as JSON"):
        texts(open_corpus(tmp_path / "deep.jsonl"))


def test_damaged_parquet_pages_are_a_user_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [f"document number {i} " * 20 for i in range(200)]}), path)
    data = bytearray(path.read_bytes())
    data[100:2000] = bytes(1900)   # the footer survives, the pages do not
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"data.parquet' cannot be read after row 0"):
        texts(open_corpus(path))
