"""meta.json, the file that makes a directory a shard set, and the checks made before reading one.

    meta = read_meta("data/shakespeare")              # every field type-checked
    tokens = open_tokens("data/shakespeare", "val")   # a read-only memmap, its size checked
    check_shards("data/shakespeare", tokenizer)       # same tokenizer, every id in its vocabulary
    print(describe_shards("data/shakespeare"))

meta.json records the tokenizer's fingerprint (so a shard is never read with another tokenizer),
the dtype, and token, document and UTF-8 byte counts per split (bytes turn a loss in nats/token
into bits per byte). It also records where the tokenizer is, *relative to the shard directory*,
so `pretrain` finds it from any working directory; `read_meta` turns that back into a path.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np

from ..errors import UserError
from ..io import read_json, write_json_atomic

SPLITS = ("train", "val")
META_FILE = "meta.json"
FORMAT_VERSION = 1
DTYPES = ("uint16", "uint32")
_REPREPARE = "re-run `lmforge data prepare`"


@dataclass
class SplitStats:
    """Counts for one split. `tokens` includes the end-of-text tokens between documents."""

    file: str
    tokens: int = 0
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents' text (separators excluded)
    max_token_id: int = -1

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


@dataclass
class ShardMeta:
    """The contents of meta.json."""

    tokenizer_fingerprint: str
    # The tokenizer `prepare` used: a path (in meta.json relative to the shard directory; here, as
    # `read_meta` resolved it) or a bundled name such as "minilm".
    tokenizer: str
    vocab_size: int
    dtype: str  # "uint16" | "uint32"
    eot_id: int
    special_tokens: dict[str, int]
    source: dict[str, Any]
    val_fraction: float
    train: SplitStats
    val: SplitStats
    val_document_names: list[str] | None  # None when more than shards.MAX_LISTED_VAL_DOCUMENTS
    created_at: str
    lmforge_version: str
    format_version: int = FORMAT_VERSION
    # The tokenizer's mask token ("<|mask|>", BERT's "[MASK]", ...). meta.json files written before
    # it was recorded lack it; for them (and when it is None) "<|mask|>" is looked up, as before.
    mask_id: int | None = None

    def __post_init__(self) -> None:
        if self.mask_id is None:
            self.mask_id = self.special_tokens.get("<|mask|>")

    def split(self, name: str) -> SplitStats:
        if name not in SPLITS:
            raise UserError(f"split '{name}' does not exist; use one of: {', '.join(SPLITS)}")
        return self.train if name == "train" else self.val

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> ShardMeta:
        """meta.json contents -> ShardMeta, after checking every field's type and range, so a damaged
        or hand-edited file is one clear error here, not a TypeError deep inside a loader."""
        if not isinstance(data, dict):
            raise UserError(f"'{where}' is not a JSON object; {_REPREPARE}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is MISSING)  # fields with defaults are optional
        if missing:
            raise UserError(f"'{where}' is missing {', '.join(missing)}; it was not written by this version of "
                            f"lmforge -- {_REPREPARE}")
        fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        for name, value in fields.items():
            check, expected = _FIELD_CHECKS[name]
            if not check(value):
                _bad(where, name, value, expected)
        if fields.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise UserError(f"'{where}' has format_version {fields['format_version']}, newer than this lmforge "
                            f"reads ({FORMAT_VERSION}); upgrade lmforge or {_REPREPARE}")
        vocab_size = fields["vocab_size"]
        if fields["dtype"] != token_dtype(vocab_size).name:
            _bad(where, "dtype", fields["dtype"], f"{token_dtype(vocab_size).name} (what vocab_size {vocab_size} needs)")
        for name in ("eot_id", "mask_id"):
            if fields.get(name) is not None and not fields[name] < vocab_size:
                _bad(where, name, fields[name], f"an id below vocab_size {vocab_size}")
        for split in SPLITS:
            fields[split] = _split_stats(fields[split], f"{split}", where)
        return cls(**fields)


def _is_int(value: Any, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum   # type() is int: JSON true is not a count


def _is_number(value: Any) -> bool:
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:   # an integer with hundreds of digits
        return False


def _is_str_to_id(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_int(v) for k, v in value.items())


_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tokenizer_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "tokenizer": (lambda v: isinstance(v, str) and v != "", "a tokenizer path or name"),
    "vocab_size": (lambda v: _is_int(v, 1) and v <= 1 << 32, "a positive vocabulary size"),
    "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "eot_id": (_is_int, "a token id"),
    "special_tokens": (_is_str_to_id, "a mapping of token text to id"),
    "source": (lambda v: isinstance(v, dict), "a JSON object"),
    "val_fraction": (_is_number, "a number"),
    "train": (lambda v: isinstance(v, dict), "a JSON object of counts"),
    "val": (lambda v: isinstance(v, dict), "a JSON object of counts"),
    "val_document_names": (lambda v: v is None or isinstance(v, list) and all(isinstance(n, str) for n in v),
                           "null or a list of names"),
    "created_at": (lambda v: isinstance(v, str), "a string"),
    "lmforge_version": (lambda v: isinstance(v, str), "a string"),
    "format_version": (lambda v: _is_int(v, 1), "a positive integer"),
    "mask_id": (lambda v: v is None or _is_int(v), "null or a token id"),
}
_SPLIT_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # A bare file name: the shard lives in the directory of its meta.json.
    "file": (lambda v: isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v,
             "a file name in the shard directory"),
    "tokens": (_is_int, "a count"),
    "documents": (_is_int, "a count"),
    "bytes": (_is_int, "a count"),
    "max_token_id": (lambda v: _is_int(v, -1), "a token id (or -1)"),
}


def _split_stats(data: dict[str, Any], split: str, where: str) -> SplitStats:
    unknown = sorted(set(data) - set(_SPLIT_CHECKS))
    if unknown or "file" not in data:
        detail = f"unknown key '{unknown[0]}'" if unknown else "no 'file'"
        raise UserError(f"'{where}' has malformed {split} counts ({detail}); {_REPREPARE}")
    for name, value in data.items():
        check, expected = _SPLIT_CHECKS[name]
        if not check(value):
            _bad(where, f"{split}.{name}", value, expected)
    return SplitStats(**data)


def _bad(where: str, name: str, value: Any, expected: str) -> NoReturn:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise UserError(f"'{where}' has {name} = {shown}, which is not {expected}; the file is damaged -- {_REPREPARE}")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabulary under 65,536), uint32 otherwise."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


# ---------------------------------------------------------------- the tokenizer's location

def tokenizer_reference(tokenizer: str, directory: str | os.PathLike) -> str:
    """What meta.json stores for the tokenizer: its path relative to the shard directory (so the
    pair can be moved together and read from any working directory), or a bundled name as given."""
    path = Path(tokenizer).expanduser()
    if not path.exists():
        return str(tokenizer)   # "minilm", "smollm2": names load_tokenizer resolves itself
    return os.path.relpath(path.resolve(), Path(directory).resolve())


def resolve_tokenizer(stored: str, directory: str | os.PathLike) -> str:
    """The tokenizer path meta.json's value means, tried as: relative to the shard directory (what
    `prepare` writes), then as written (older files held an absolute or cwd-relative path); a
    value that is neither (a bundled name, a deleted tokenizer) is returned as it is."""
    beside = Path(directory) / stored
    if beside.exists():
        return str(beside.resolve())
    return stored


# ---------------------------------------------------------------- reading and writing

def read_meta(directory: str | os.PathLike) -> ShardMeta:
    path = Path(directory) / META_FILE
    if not path.is_file():
        hint = " (an interrupted prepare leaves none)" if Path(directory).is_dir() else ""
        raise UserError(f"'{directory}' has no {META_FILE}{hint}; prepare shards with "
                        f"`lmforge data prepare --corpus CORPUS --tokenizer DIR --out {directory}`")
    meta = ShardMeta.from_json(read_json(path, what="shard metadata"), where=str(path))
    meta.tokenizer = resolve_tokenizer(meta.tokenizer, directory)
    return meta


def write_meta(meta: ShardMeta, directory: str | os.PathLike) -> None:
    """Write DIR/meta.json atomically, the tokenizer stored relative to DIR."""
    data = meta.to_json()
    data["tokenizer"] = tokenizer_reference(meta.tokenizer, directory)
    write_json_atomic(Path(directory) / META_FILE, data)


def open_tokens(directory: str | os.PathLike, split: str, meta: ShardMeta | None = None) -> np.memmap:
    """Memory-map DIR/{split}.bin as a read-only 1-D array of token ids, after checking its size."""
    meta = meta or read_meta(directory)
    stats = meta.split(split)
    path = Path(directory) / stats.file
    if not path.is_file():
        raise UserError(f"'{path}' is missing; re-run `lmforge data prepare` for '{directory}'")
    itemsize = np.dtype(meta.dtype).itemsize
    if path.stat().st_size != stats.tokens * itemsize:
        raise UserError(f"'{path}' has {path.stat().st_size} bytes but meta.json says {stats.tokens} {meta.dtype} "
                        f"tokens; the shard is damaged -- {_REPREPARE}")
    if stats.tokens == 0:
        raise UserError(f"the {split} split in '{directory}' is empty; prepare it from a larger corpus")
    return np.memmap(path, dtype=meta.dtype, mode="r")


# ---------------------------------------------------------------- checks shared with training

def check_vocabulary(tokenizer: Any, where: str) -> None:
    """A byte-level vocabulary needs all 256 bytes plus its special tokens."""
    minimum = 256 + len(tokenizer.special_tokens)
    if tokenizer.vocab_size < minimum:
        raise UserError(f"tokenizer '{where}' has {tokenizer.vocab_size} tokens, fewer than the 256 bytes + "
                        f"{len(tokenizer.special_tokens)} special tokens a byte-level vocabulary needs; "
                        f"retrain it with a vocabulary of at least {minimum}")
    if tokenizer.eot_id is None:
        raise UserError(f"tokenizer '{where}' has no end-of-text token to separate documents; "
                        "use a tokenizer with <|endoftext|> among its special tokens")


def max_token_id(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """Largest id in a (memory-mapped) token array, read a chunk at a time."""
    return max(int(tokens[start:start + chunk].max()) for start in range(0, len(tokens), chunk))


def check_shards(directory: str | os.PathLike, tokenizer: Any) -> ShardMeta:
    """Check that the shards in `directory` were prepared with `tokenizer` and fit its vocabulary.

    Training calls this before reading a batch, so a mismatch is one clear error, not an
    index error deep inside an embedding (or, worse, silently wrong tokens).
    """
    check_vocabulary(tokenizer, where="the model's tokenizer")
    meta = read_meta(directory)
    fingerprint = tokenizer.fingerprint()
    if meta.tokenizer_fingerprint != fingerprint:
        raise UserError(f"the shards in '{directory}' were prepared with another tokenizer (fingerprint "
                        f"{meta.tokenizer_fingerprint[:12]}, not {fingerprint[:12]}); re-run `lmforge data prepare "
                        f"--corpus {_source_argument(meta)} --tokenizer YOUR_TOKENIZER_DIR --out {directory}`")
    for split in SPLITS:
        tokens = open_tokens(directory, split, meta)
        largest = max_token_id(tokens)
        if largest >= tokenizer.vocab_size:
            raise UserError(f"'{Path(directory) / meta.split(split).file}' holds token id {largest}, at or above the "
                            f"tokenizer's vocabulary size {tokenizer.vocab_size}; re-run `lmforge data prepare` "
                            "with this tokenizer")
    return meta


def _source_argument(meta: ShardMeta) -> str:
    source = meta.source
    return str(source.get("name") or source.get("path") or "CORPUS")


# ---------------------------------------------------------------- stats

def describe_shards(directory: str | os.PathLike) -> str:
    """A short human-readable summary of meta.json (what `lmforge data stats` prints)."""
    meta = read_meta(directory)
    source = meta.source
    source_text = source.get("name") or source.get("path") or "?"
    details = ", ".join(f"{key}={value!r}" for key, value in source.items() if key not in ("name", "path", "kind"))
    lines = [
        f"shards:     {directory}",
        f"source:     {source_text} ({source.get('kind')}{', ' + details if details else ''})",
        f"tokenizer:  {meta.tokenizer} (fingerprint {meta.tokenizer_fingerprint[:12]}, vocab {meta.vocab_size:,}, "
        f"eot id {meta.eot_id})",
        f"dtype:      {meta.dtype}",
        f"created:    {meta.created_at} by lmforge {meta.lmforge_version}",
        "",
        f"{'split':<6} {'documents':>10} {'tokens':>14} {'bytes':>14} {'bytes/token':>12}",
    ]
    for split in SPLITS:
        stats = meta.split(split)
        lines.append(f"{split:<6} {stats.documents:>10,} {stats.tokens:>14,} {stats.bytes:>14,} "
                     f"{stats.bytes_per_token:>12.3f}")
    if meta.val_document_names is not None:
        lines += ["", f"val documents: {', '.join(meta.val_document_names)}"]
    return "\n".join(lines)
