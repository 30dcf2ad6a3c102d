"""Token shards: a corpus -> DIR/train.bin, DIR/val.bin and DIR/meta.json.

    meta = prepare_shards("shakespeare", "artifacts/tokenizer", "data/shakespeare")
    print(describe_shards("data/shakespeare"))

Each .bin file is a flat array of token ids (uint16 when the vocabulary has fewer than 65,536
entries, uint32 otherwise) with the end-of-text token between documents:

    doc0 <eot> doc1 <eot> doc2

Validation holds out whole documents (whole plays for Shakespeare), chosen deterministically, so
validation text is never seen in training. meta.json (see `shard_meta`, which reads and checks it;
its names are re-exported here) records the tokenizer, the dtype and the counts per split.

Nothing half-written: both .bin files are streamed to temporary files and renamed only once
complete, and meta.json -- the file that makes a directory a shard set -- is removed before the
renames and written last. Tokenization runs in a process pool over bounded batches of text, so
memory holds a few batches and one document, never the corpus.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

import numpy as np

from ..errors import UserError
from ..io import atomic_path, ensure_writable_dir
from ..workers import ordered_map
from .corpora import Corpus, open_corpus
from .shard_meta import (FORMAT_VERSION, META_FILE, SPLITS, ShardMeta, SplitStats, check_shards,
                         check_vocabulary, describe_shards, max_token_id, open_tokens, read_meta,
                         resolve_tokenizer, token_dtype, tokenizer_reference, write_meta)

if TYPE_CHECKING:
    from ..tokenizer.pretokenize import PreTokenizer

__all__ = ["prepare_shards", "choose_val_documents", "encode_texts", "default_num_workers",
           # meta.json, from shard_meta
           "FORMAT_VERSION", "META_FILE", "SPLITS", "ShardMeta", "SplitStats", "check_shards", "check_vocabulary",
           "describe_shards", "max_token_id", "open_tokens", "read_meta", "token_dtype"]

# Long documents are tokenized in pieces, so one huge file still spreads over the pool. Pieces end
# only where the tokenizer's pre-tokenizer proves a cut changes no token (`_cut_pieces`).
PIECE_CHARS = 1 << 18
# Characters per pool task: big enough to amortize inter-process transfer, small enough to balance.
TASK_CHARS = 1 << 18
# How many names of held-out documents meta.json lists (more would bloat it for record corpora).
MAX_LISTED_VAL_DOCUMENTS = 100


# ---------------------------------------------------------------- the validation split

def choose_val_documents(n_documents: int, val_fraction: float, corpus_name: str) -> list[int]:
    """Indices of the documents held out for validation: evenly spaced, the same on every run.

    round(n * val_fraction) documents (at least one, and at least one left for training), at the
    middles of n_val equal slices of the corpus, so they are spread over it, not bunched at the end.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} is outside (0, 1); use e.g. 0.05 for 5% of documents")
    if n_documents == 0:
        raise UserError(f"corpus '{corpus_name}' is empty (no document has any text); "
                        "point --corpus at files with text, or fix --text-field / --separator")
    if n_documents == 1:
        raise UserError(f"corpus '{corpus_name}' is a single document, but validation holds out whole documents; "
                        "split it with --separator (e.g. --separator '\\n\\n') or give a directory of files")
    n_val = min(n_documents - 1, max(1, round(n_documents * val_fraction)))
    return [int((j + 0.5) * n_documents / n_val) for j in range(n_val)]


# ---------------------------------------------------------------- tokenizing in a pool

_worker_tokenizer: Any = None


def _init_worker(tokenizer_path: str) -> None:
    """Each pool process loads the tokenizer from its directory once."""
    global _worker_tokenizer
    from ..tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_in_worker(task: list[_Piece]) -> list[tuple[np.ndarray, int]]:
    return encode_texts(_worker_tokenizer, [piece.text for piece in task])


def encode_texts(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, int]]:
    """(token ids in the shard dtype, UTF-8 byte count) per text; ids outside the vocabulary are an error.

    Documents are ordinary text: a literal "<|endoftext|>" in one is encoded as characters, never as
    the control token, so the only special ids in a shard are the separators `prepare` inserts.
    """
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    encoded = []
    for text, ids in zip(texts, tokenizer.encode_batch(texts, allow_special=False)):
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= vocab_size):
            bad = int(array.max()) if array.max() >= vocab_size else int(array.min())
            raise UserError(f"the tokenizer produced token id {bad}, outside its vocabulary of {vocab_size}; "
                            "its files are inconsistent -- retrain or re-save the tokenizer")
        encoded.append((array.astype(dtype), len(text.encode("utf-8"))))
    return encoded


@dataclass(frozen=True)
class _Piece:
    split: str
    starts_document: bool
    text: str


def _ordinary_pretokenizer(tokenizer: Any) -> PreTokenizer | None:
    """The pre-tokenizer that decides where a document (encoded as ordinary text) may be cut, or
    None for tokenizers whose pre-tokenization we cannot reason about (HF WordPiece, Unigram, ...)."""
    from ..tokenizer import BPETokenizer, PreTokenizer

    if isinstance(tokenizer, BPETokenizer):
        # No special tokens: documents are encoded without them, so a cut before one is not safe.
        return PreTokenizer(tokenizer.pattern, tokenizer.split_digits)
    return None


def _cut_pieces(text: str, limit: int, pretokenizer: PreTokenizer | None) -> Iterator[str]:
    """Cut text into pieces of about `limit` characters whose ids, one piece at a time, are the ids
    of the whole: only at `PreTokenizer.last_safe_cut` points, so text without them (any text under
    a custom regex or without a pre-tokenizer, a long run without spaces) is never split."""
    from ..tokenizer.pretokenize import split_at_safe_points

    if pretokenizer is None or len(text) <= limit:
        yield text
        return
    # Blocks of limit/2 regrouped at safe points give pieces under `limit` wherever cuts are dense.
    half = max(limit // 2, 1)
    blocks = (text[start:start + half] for start in range(0, len(text), half))
    yield from split_at_safe_points(blocks, pretokenizer, half)


def _tasks(pieces: Iterator[_Piece], task_chars: int) -> Iterator[list[_Piece]]:
    task: list[_Piece] = []
    size = 0
    for piece in pieces:
        task.append(piece)
        size += len(piece.text)
        if size >= task_chars:
            yield task
            task, size = [], 0
    if task:
        yield task


def _encode_tasks(tasks: Iterator[list[_Piece]], tokenizer: Any, tokenizer_path: str,
                  num_workers: int) -> Iterator[tuple[list[_Piece], list[tuple[np.ndarray, int]]]]:
    """Encode tasks in order; at most 2 tasks per worker are in flight, which bounds memory."""
    if num_workers <= 1:
        for task in tasks:
            yield task, encode_texts(tokenizer, [piece.text for piece in task])
        return
    yield from ordered_map(_encode_in_worker, tasks, num_workers, _init_worker, (tokenizer_path,))


class _SplitWriter:
    """Appends documents to one .bin file, with the end-of-text token between them."""

    def __init__(self, handle: BinaryIO, stats: SplitStats, eot_id: int, dtype: np.dtype) -> None:
        self.handle = handle
        self.stats = stats
        self.separator = np.array([eot_id], dtype=dtype)

    def start_document(self) -> None:
        if self.stats.documents:
            self._write(self.separator)
        self.stats.documents += 1

    def write(self, ids: np.ndarray, n_bytes: int) -> None:
        self._write(ids)
        self.stats.bytes += n_bytes

    def _write(self, ids: np.ndarray) -> None:
        if ids.size:
            self.handle.write(ids.tobytes())
            self.stats.tokens += int(ids.size)
            self.stats.max_token_id = max(self.stats.max_token_id, int(ids.max()))


# ---------------------------------------------------------------- prepare

def default_num_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1) - 1))


def prepare_shards(corpus: str | os.PathLike | Corpus, tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
                   val_fraction: float = 0.05, *, text_field: str = "text", separator: str | None = None,
                   dataset_split: str = "train", num_workers: int | None = None,
                   progress: bool = True) -> ShardMeta:
    """Tokenize `corpus` with the tokenizer in directory `tokenizer` into shards in `out_dir`.

    corpus: "shakespeare", a .txt/.jsonl/.parquet file, a directory of them, a `datasets`
        save_to_disk directory or a dataset name in the local HF cache (see corpora.open_corpus).
    num_workers: tokenizer processes (default: cores - 1, at most 8; 1 tokenizes in this process).
    Returns the metadata also written to out_dir/meta.json.
    """
    from .. import __version__
    from ..tokenizer import load_tokenizer

    tokenizer_path = str(tokenizer)
    loaded = load_tokenizer(tokenizer_path)
    check_vocabulary(loaded, where=tokenizer_path)
    if not isinstance(corpus, Corpus):
        corpus = open_corpus(corpus, text_field=text_field, separator=separator, dataset_split=dataset_split)
    corpus_name = corpus.source.get("name") or corpus.source.get("path") or str(corpus.source)

    # A first, tokenizer-free pass counts documents, so the held-out ones can be chosen up front.
    n_documents, n_chars = 0, 0
    for document in corpus.documents():
        n_documents += 1
        n_chars += len(document.text)
    val_indices = set(choose_val_documents(n_documents, val_fraction, corpus_name))

    workers = default_num_workers() if num_workers is None else num_workers
    # Spawning processes costs more than it saves on a small corpus.
    workers = max(1, min(workers, -(-n_chars // TASK_CHARS)))
    created = not Path(out_dir).exists()
    out = ensure_writable_dir(out_dir)
    try:
        stats, val_names = _write_splits(corpus, val_indices, loaded, tokenizer_path, out, workers,
                                         n_documents, n_chars, progress)
    except BaseException:
        if created:  # leave no trace of a failed prepare (rmdir only removes an empty directory)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise

    # The tokenizer as `read_meta` will give it back: meta.json holds it relative to `out`.
    tokenizer_ref = resolve_tokenizer(tokenizer_reference(tokenizer_path, out), out)
    meta = ShardMeta(
        tokenizer_fingerprint=loaded.fingerprint(), tokenizer=tokenizer_ref, vocab_size=loaded.vocab_size,
        dtype=token_dtype(loaded.vocab_size).name, eot_id=loaded.eot_id, special_tokens=dict(loaded.special_tokens),
        source=corpus.source, val_fraction=val_fraction, train=stats["train"], val=stats["val"],
        val_document_names=val_names if len(val_indices) <= MAX_LISTED_VAL_DOCUMENTS else None,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), lmforge_version=__version__,
        mask_id=loaded.mask_id,
    )
    write_meta(meta, out)
    return meta


def _write_splits(corpus: Corpus, val_indices: set[int], tokenizer: Any, tokenizer_path: str, out: Path,
                  workers: int, n_documents: int, n_chars: int,
                  progress: bool) -> tuple[dict[str, SplitStats], list[str]]:
    """Stream the tokenized corpus into out/train.bin and out/val.bin; return their counts."""
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    stats = {split: SplitStats(file=f"{split}.bin") for split in SPLITS}
    val_names: list[str] = []

    cut_with = _ordinary_pretokenizer(tokenizer)

    def pieces() -> Iterator[_Piece]:
        for index, document in enumerate(corpus.documents()):
            split = "val" if index in val_indices else "train"
            if split == "val" and len(val_names) < MAX_LISTED_VAL_DOCUMENTS:
                val_names.append(document.name)
            for number, text in enumerate(_cut_pieces(document.text, PIECE_CHARS, cut_with)):
                yield _Piece(split, number == 0, text)

    with atomic_path(out / "train.bin") as train_tmp, atomic_path(out / "val.bin") as val_tmp:
        with open(train_tmp, "wb") as train_file, open(val_tmp, "wb") as val_file, \
                tqdm(total=n_chars, unit="char", unit_scale=True, desc=f"tokenizing {n_documents} documents",
                     file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            writers = {"train": _SplitWriter(train_file, stats["train"], tokenizer.eot_id, dtype),
                       "val": _SplitWriter(val_file, stats["val"], tokenizer.eot_id, dtype)}
            encoded = _encode_tasks(_tasks(pieces(), TASK_CHARS), tokenizer, tokenizer_path, workers)
            with contextlib.closing(encoded):  # stops the pool at once if anything below fails
                for task, results in encoded:
                    for piece, (ids, n_bytes) in zip(task, results):
                        writer = writers[piece.split]
                        if piece.starts_document:
                            writer.start_document()
                        writer.write(ids, n_bytes)
                        bar.update(len(piece.text))
        # The new .bin files are complete; drop the old meta.json so that, until the new one is
        # written, the directory cannot pass for a valid shard set.
        (out / META_FILE).unlink(missing_ok=True)
    return stats, val_names
