"""One reader for the header of a GGUF file (llama.cpp's format): metadata and tensor shapes.

    header = read_gguf_header("model.gguf")                       # scalars + tensor shapes (fast)
    header = read_gguf_header("model.gguf", arrays=("tokenizer.",), tensors=False)   # + the vocabulary

Both the model layer (`lmforge model info`, the Llama config) and the tokenizer layer (the
embedded BPE) read GGUF headers; this module sits below both, so neither imports the other.

Why not `gguf.GGUFReader`: it builds a numpy view for every element of every array (~100k
tokenizer strings), which takes seconds, while `model info` needs a dozen numbers. Layout
(GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key/value count;
each key/value is a u64-length UTF-8 key, a u32 value type and the value; then each tensor is a
name, u32 n_dims, n_dims x u64 dims (fastest dimension first), u32 type and u64 data offset.
Every length and count is checked against the file size, so a damaged file is one `ValueError`
(wrapped by callers into a UserError naming the file), never a huge allocation.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

# GGUF value types (gguf.GGUFValueType) -> struct format of one little-endian scalar.
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_ARRAY_DEPTH = 4   # arrays of arrays exist in the spec; deeper nesting means a damaged file


@dataclass
class GGUFHeader:
    """A GGUF file's metadata (arrays only where asked for) and tensor shapes (GGUF order)."""

    metadata: dict[str, Any]
    tensor_shapes: dict[str, list[int]] = field(default_factory=dict)


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, data: Any) -> None:
        self.data, self.offset, self.size = data, 0, len(data)

    def need(self, size: int) -> None:
        if size < 0 or self.offset + size > self.size:
            raise ValueError("its header is truncated")

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        self.need(length)
        self.offset += length
        return bytes(self.data[self.offset - length:self.offset]).decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool, depth: int = 0) -> Any:
        """One value of GGUF type `kind`; arrays are skipped (None) unless `keep`."""
        if kind == STRING:
            return self.string()
        if kind in SCALAR_FORMATS:
            return self.take(SCALAR_FORMATS[kind])
        if kind != ARRAY:
            raise ValueError(f"a metadata value has the unknown type {kind}")
        if depth >= MAX_ARRAY_DEPTH:
            raise ValueError("its metadata nests arrays too deeply")
        item_kind, count = self.take("<I"), self.take("<Q")
        if item_kind in SCALAR_FORMATS:
            fmt = SCALAR_FORMATS[item_kind]
            size = count * struct.calcsize(fmt)
            self.need(size)
            start = self.offset
            self.offset += size
            return list(struct.unpack_from(f"<{count}{fmt[1:]}", self.data, start)) if keep else None
        if item_kind not in (STRING, ARRAY):
            raise ValueError(f"a metadata array has the unknown item type {item_kind}")
        # Every item takes at least 8 bytes (a string's length, an array's type and count).
        self.need(count * 8)
        items = [self.value(item_kind, keep, depth + 1) for _ in range(count)]
        return items if keep else None


def read_gguf_header(path: str | os.PathLike, arrays: tuple[str, ...] = (), tensors: bool = True) -> GGUFHeader:
    """The header of a GGUF file: every scalar and string, the arrays whose key starts with one of
    `arrays` (others are skipped), and, if `tensors`, every tensor's shape.

    Raises UserError for a missing, truncated or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file '{path}' does not exist; check the path")
    size = path.stat().st_size
    if size < 24:   # magic, version and the two counts
        raise UserError(f"'{path}' is not a readable GGUF file (it is {size} bytes); re-download it")
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(_Cursor(data), arrays, tensors)
    except (ValueError, struct.error, OverflowError, MemoryError) as error:
        raise UserError(f"'{path}' is not a readable GGUF file ({error}); re-download it") from None
    except OSError as error:
        raise UserError(f"'{path}' cannot be read ({error.strerror or error}); check the file") from None


def _parse(cursor: _Cursor, arrays: tuple[str, ...], tensors: bool) -> GGUFHeader:
    if bytes(cursor.data[:4]) != b"GGUF":
        raise ValueError(f"it does not start with the GGUF magic (found {bytes(cursor.data[:4])!r})")
    cursor.offset = 4
    version = cursor.take("<I")
    if version not in (2, 3):
        raise ValueError(f"it is GGUF version {version}; lmforge reads little-endian versions 2 and 3")
    tensor_count, kv_count = cursor.take("<Q"), cursor.take("<Q")
    # Each key/value takes at least 12 bytes and each tensor at least 24: a count beyond what the
    # file can hold is damage, caught before any loop runs for it.
    cursor.need(kv_count * 12)
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key, kind = cursor.string(), cursor.take("<I")
        value = cursor.value(kind, keep=key.startswith(arrays) if arrays else False)
        if value is not None:
            metadata[key] = value
    shapes: dict[str, list[int]] = {}
    if tensors:
        cursor.need(tensor_count * 24)
        for _ in range(tensor_count):
            name, n_dims = cursor.string(), cursor.take("<I")
            if n_dims > 8:   # llama.cpp's GGML_MAX_DIMS is 4
                raise ValueError(f"tensor '{name}' claims {n_dims} dimensions")
            shapes[name] = [cursor.take("<Q") for _ in range(n_dims)]
            cursor.take("<I")   # tensor type
            cursor.take("<Q")   # data offset
    return GGUFHeader(metadata, shapes)
