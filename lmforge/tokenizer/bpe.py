"""The byte-level BPE tokenizer: encode, decode, save, and the contract the other folders use.

Data (general enough for imported tokenizers, whose ids are not in merge order):
- `vocab`: token bytes -> id, for the single bytes (normally all 256) and every merged token;
- `merges`: ranked list of (left bytes, right bytes); rank 0 is applied first;
- `special_tokens`: text -> id, matched whole in the input, never merged with anything.
For tokenizers we train, ids are 256 bytes in byte order, then merges in order, then specials,
so a merged token's id is 256 + its merge rank (ids grow with rank: the tiktoken export is exact).

Encoding a piece of text: split off special tokens, pre-tokenize the rest, and run BPE on the
UTF-8 bytes of each piece: start from single bytes and repeatedly merge the adjacent pair of
lowest rank, like GPT-2 and HF `tokenizers`. Results are cached per segment, so common words
cost one dict lookup; the hot path is C-level (regex split, dict lookups, itertools.chain).

Files: `formats` (tokenizer.json, GPT-2 files, tiktoken) and `gguf_import` read them into
`parts.BPEParts`, which `from_parts` builds the tokenizer from, and write any tokenizer-shaped
object; they never import this module, so imports go one way (bpe -> formats -> parts).
"""
from __future__ import annotations

import hashlib
import json
import os
from heapq import heapify, heappop, heappush
from itertools import chain, pairwise, repeat
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..errors import UserError
from . import formats, gguf_import
from .parts import BPEParts
from .pretokenize import GPT2_PATTERN, PreTokenizer, split_at_safe_points
from .special_tokens import ENDOFTEXT, MASK, PAD, chat_template_for

_REPLACEMENT = "\ufffd".encode("utf-8")  # what decode shows for an id it does not know
_NO_MERGE = 1 << 62  # rank of a pair that has no merge
_DEFAULT_CACHE_SIZE = 100_000  # segments; a full cache is cleared (bounded memory, simple)
_SHORT_PIECE = 8  # bytes; longer pieces use the heap merge (measured crossover: 6-8 bytes)
_MAX_ID = 1 << 31  # token ids must fit an int32 embedding index


class BPETokenizer:
    """A byte-level BPE tokenizer (see the module docstring for the data it holds).

    Special-token roles (`bos_token`, `eos_token`, `pad_token`, `mask_token`) name special tokens;
    `eot_id` is `<|endoftext|>` when present (the document separator), else the eos token.
    """

    def __init__(self, vocab: Mapping[bytes, int], merges: Sequence[tuple[bytes, bytes]],
                 special_tokens: Mapping[str, int] | None = None, *, pattern: str = GPT2_PATTERN,
                 split_digits: bool = False, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, mask_token: str | None = None,
                 cache_size: int = _DEFAULT_CACHE_SIZE) -> None:
        # vocab, merges and specials are fixed once built (the lookup tables below derive from them).
        self.vocab: dict[bytes, int] = dict(vocab)
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self._special_tokens: dict[str, int] = dict(special_tokens or {})
        self.pattern = pattern
        self.split_digits = split_digits
        self.chat_template = chat_template
        self.cache_size = cache_size
        self._roles = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "mask": mask_token}
        self._check()

        self._pretokenizer = PreTokenizer(pattern, split_digits, tuple(self._special_tokens))
        # A vocabulary may lack some bytes (SmolLM2 lacks 21 control bytes); like HF's BPE without
        # an unknown token, encoding drops such bytes.
        self._byte_ids = [self.vocab.get(bytes([byte])) for byte in range(256)]
        self._lacks_bytes = None in self._byte_ids
        # (left id, right id) -> merge rank, and merge rank -> id of the merged token
        self._rank_of = {(self.vocab[a], self.vocab[b]): rank for rank, (a, b) in enumerate(self.merges)}
        if len(self._rank_of) != len(self.merges):
            raise ValueError("the merge list holds the same pair twice")
        self._merged_id = [self.vocab[a + b] for a, b in self.merges]
        self._bytes_of: dict[int, bytes] = {index: token for token, index in self.vocab.items()}
        self._bytes_of.update({index: text.encode("utf-8") for text, index in self._special_tokens.items()})
        self._special_ids = frozenset(self._special_tokens.values())
        self._vocab_size = max(self._bytes_of) + 1
        self._fingerprint: str | None = None
        self._cache: dict[str, tuple[int, ...]] = {}

    def _check(self) -> None:
        for rank, (left, right) in enumerate(self.merges):
            if left not in self.vocab or right not in self.vocab or left + right not in self.vocab:
                raise ValueError(f"merge {rank} ({left!r}, {right!r}) uses or makes a token that is not in the vocabulary")
        if len(set(self.vocab.values())) != len(self.vocab):
            raise ValueError("two vocabulary tokens share an id")
        # Ids index an embedding table: negative ones cannot, and ids past 2**31 would size it absurdly.
        ids = [*self.vocab.values(), *self._special_tokens.values()]
        if not ids:
            raise ValueError("it has no tokens")
        if min(ids) < 0 or max(ids) >= _MAX_ID:
            raise ValueError(f"token id {min(ids) if min(ids) < 0 else max(ids)} is outside 0..{_MAX_ID - 1}")
        by_id = {index: token for token, index in self.vocab.items()}
        for text, index in self._special_tokens.items():
            if index in by_id and by_id[index] != text.encode("utf-8"):
                raise ValueError(f"special token {text!r} has id {index}, which already belongs to {by_id[index]!r}")
        for role, token in self._roles.items():
            if token is not None and token not in self._special_tokens:
                raise ValueError(f"the {role} token {token!r} is not one of the special tokens")

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_merges(cls, merges: Sequence[tuple[bytes, bytes]], special_tokens: Sequence[str] = (),
                    pattern: str = GPT2_PATTERN, split_digits: bool = False) -> "BPETokenizer":
        """Our own layout: ids = 256 bytes, then merges in order, then specials; default roles."""
        vocab = {bytes([byte]): byte for byte in range(256)}
        for left, right in merges:
            vocab[left + right] = len(vocab)
        specials = {text: len(vocab) + offset for offset, text in enumerate(special_tokens)}
        return cls(vocab, merges, specials, pattern=pattern, split_digits=split_digits,
                   chat_template=chat_template_for(specials),
                   eos_token=ENDOFTEXT if ENDOFTEXT in specials else None,
                   pad_token=PAD if PAD in specials else None,
                   mask_token=MASK if MASK in specials else None)

    @classmethod
    def from_parts(cls, parts: BPEParts) -> "BPETokenizer":
        """The tokenizer a file format read (see `parts`); an inconsistent file is a UserError."""
        try:
            return cls(parts.vocab, parts.merges, parts.special_tokens, pattern=parts.pattern,
                       split_digits=parts.split_digits, chat_template=parts.chat_template,
                       bos_token=parts.roles.get("bos"), eos_token=parts.roles.get("eos"),
                       pad_token=parts.roles.get("pad"), mask_token=parts.roles.get("mask"))
        except ValueError as error:   # also the regex of a tokenizer.json that does not compile
            raise UserError(f"{parts.source} is not a consistent byte-level BPE tokenizer ({error}); "
                            "re-export it") from None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BPETokenizer":
        """A directory saved by `save` (or any HF directory holding a byte-level BPE tokenizer.json)."""
        return cls.from_parts(formats.read_hf_directory(directory))

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> "BPETokenizer":
        """An HF `tokenizer.json` of a byte-level BPE (config: a tokenizer_config.json dict)."""
        return cls.from_parts(formats.read_hf_json(path, config))

    @classmethod
    def from_gpt2_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                        special_tokens: Sequence[str] | None = None) -> "BPETokenizer":
        """GPT-2's `vocab.json` + `merges.txt`."""
        return cls.from_parts(formats.read_gpt2_files(vocab_path, merges_path, special_tokens))

    @classmethod
    def from_gguf(cls, source: Any, split_digits: bool | None = None) -> "BPETokenizer":
        """The byte-level BPE embedded in a GGUF file (a path, or an open `gguf.GGUFReader`)."""
        return cls.from_parts(gguf_import.read_gguf_tokenizer(source, split_digits))

    # --- the contract ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (specials included): the embedding table size."""
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    def _role_id(self, role: str) -> int | None:
        token = self._roles[role]
        return self._special_tokens[token] if token is not None else None

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._role_id("pad")

    @property
    def mask_id(self) -> int | None:
        return self._role_id("mask")

    @property
    def eot_id(self) -> int | None:
        """`<|endoftext|>` (the document separator in token shards), else the eos token."""
        return self._special_tokens.get(ENDOFTEXT, self.eos_id)

    @property
    def roles(self) -> dict[str, str | None]:
        """Which special token plays which role: {"bos": ..., "eos": ..., "pad": ..., "mask": ...}."""
        return dict(self._roles)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of text. Special-token strings become their ids unless allow_special=False,
        in which case they are encoded as ordinary text."""
        if not allow_special:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for run, is_special in self._pretokenizer.split_specials(text):
            if is_special:
                ids.append(self._special_tokens[run])
            elif run:
                ids.extend(self._encode_ordinary(run))
        return ids

    def encode_batch(self, texts: Iterable[str], allow_special: bool = True) -> list[list[int]]:
        return [self.encode(text, allow_special) for text in texts]

    def encode_iterable(self, lines: Iterable[str], chunk_chars: int = 1 << 16) -> Iterator[int]:
        """Ids of the concatenated lines (e.g. an open file), in constant memory.

        Lines are regrouped into chunks cut at safe points, so the ids equal
        `encode("".join(lines))` while only one chunk (and the bounded cache) is held.
        """
        for chunk in split_at_safe_points(lines, self._pretokenizer, chunk_chars):
            yield from self.encode(chunk)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of the ids. Never raises: invalid UTF-8 and unknown ids come back as U+FFFD."""
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        if skip_special_tokens:
            ids = [index for index in ids if index not in self._special_ids]
        try:
            data = b"".join(map(self._bytes_of.__getitem__, ids))
        except (KeyError, TypeError):
            data = b"".join(self._bytes_of.get(index, _REPLACEMENT) if isinstance(index, int) else _REPLACEMENT
                            for index in ids)
        return data.decode("utf-8", errors="replace")

    def id_to_bytes(self, index: int) -> bytes:
        """The bytes a token stands for (a special token's UTF-8 text)."""
        try:
            return self._bytes_of[index]
        except KeyError:
            raise ValueError(f"token id {index} is not in this tokenizer (vocab_size {self.vocab_size})") from None

    def token_to_id(self, token: str | bytes) -> int | None:
        """Id of a special token, or of a vocabulary token given as text or bytes; None if absent."""
        if isinstance(token, str):
            if token in self._special_tokens:
                return self._special_tokens[token]
            token = token.encode("utf-8")
        return self.vocab.get(token)

    def fingerprint(self) -> str:
        """A stable sha256 over vocab, merges, special tokens and pre-tokenization."""
        if self._fingerprint is not None:
            return self._fingerprint
        content = {
            "vocab": sorted((index, token.hex()) for token, index in self.vocab.items()),
            "merges": [[left.hex(), right.hex()] for left, right in self.merges],
            "special_tokens": sorted(self._special_tokens.items()),
            "pattern": self.pattern,
            "split_digits": self.split_digits,
        }
        self._fingerprint = hashlib.sha256(json.dumps(content, separators=(",", ":")).encode("utf-8")).hexdigest()
        return self._fingerprint

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` (HF-loadable) and `tokenizer_config.json` into directory."""
        return formats.save_hf_directory(self, directory)

    def save_gpt2_files(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write GPT-2 style `vocab.json` + `merges.txt` into directory."""
        return formats.save_gpt2_files(self, directory)

    def to_tiktoken(self, name: str = "lmforge"):
        """A `tiktoken.Encoding` giving the same ids (needs ids in merge order, one regex)."""
        return formats.to_tiktoken(self, name)

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={len(self._special_tokens)}, split_digits={self.split_digits})")

    # --- encoding internals ----------------------------------------------------------------

    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of text with no special-token handling."""
        segments = self._pretokenizer.segments(text)
        cache = self._cache
        if len(cache) > self.cache_size:
            cache.clear()
        missing = set(segments).difference(cache)
        if missing:
            self._encode_missing(missing)
        return list(chain.from_iterable(map(cache.__getitem__, segments)))

    def _encode_missing(self, segments: set[str]) -> None:
        """Fill the cache for new segments, running BPE once per distinct piece."""
        split = self._pretokenizer.is_builtin  # for a custom regex, segments are already pieces
        pieces_of = {segment: self._pretokenizer.pieces(segment) if split else [segment] for segment in segments}
        try:
            ids_of = {piece: self._bpe(piece.encode("utf-8")) for piece in set(chain.from_iterable(pieces_of.values()))}
        except UnicodeEncodeError as error:
            raise UserError(f"the text holds an unpaired surrogate ({error.object[error.start]!r}), which is not "
                            "valid Unicode; clean the text (e.g. decode its bytes with errors='replace')") from None
        for segment, pieces in pieces_of.items():
            self._cache[segment] = tuple(chain.from_iterable(map(ids_of.__getitem__, pieces)))

    def _bpe(self, piece: bytes) -> list[int]:
        """Merge the bytes of one pre-token, always the adjacent pair of lowest rank first
        (the leftmost one among pairs of that rank).

        Merging one occurrence at a time (the leftmost of the best rank) equals GPT-2's "merge all
        occurrences": a pair made later has a higher rank than the merge that made its token.
        """
        ids = list(map(self._byte_ids.__getitem__, piece))
        if self._lacks_bytes and None in ids:
            ids = [index for index in ids if index is not None]
        if len(ids) > _SHORT_PIECE:
            return self._bpe_long(ids)
        # Short pieces (nearly all of them): rescanning every pair after each merge is quadratic,
        # but at this length its C-level loops beat the heap's Python bookkeeping.
        rank_of = self._rank_of.get
        while len(ids) > 1:
            ranks = list(map(rank_of, zip(ids, ids[1:]), repeat(_NO_MERGE)))
            best = min(ranks)
            if best == _NO_MERGE:
                break
            position = ranks.index(best)
            ids[position:position + 2] = [self._merged_id[best]]
        return ids

    def _bpe_long(self, ids: list[int]) -> list[int]:
        """`_bpe` in O(n log n) for long pieces (a 40K-letter run without spaces would take minutes).

        Symbols form a doubly linked list over the positions of `ids` (a merged symbol keeps its
        left position; the right one is marked dead with -1). A heap holds (rank, left position)
        for candidate pairs, so popping gives the lowest rank and, among equal ranks, the leftmost
        pair -- the same choice as the short loop. Entries go stale when a neighbour merges; they
        are skipped by checking that the pair now at that position still has that rank.
        """
        rank_of = self._rank_of.get
        merged_id = self._merged_id
        size = len(ids)
        following = list(range(1, size + 1))  # size marks the end
        preceding = list(range(-1, size - 1))  # -1 marks the start
        heap = [(rank, position) for position, rank in enumerate(map(rank_of, pairwise(ids)))
                if rank is not None]
        heapify(heap)
        while heap:
            rank, left = heappop(heap)
            right = following[left]
            # A dead left symbol holds -1, so its pair has no rank and it is skipped here too.
            if right == size or rank_of((ids[left], ids[right])) != rank:
                continue
            ids[left] = merged_id[rank]
            ids[right] = -1
            after = following[right]
            following[left] = after
            if after != size:
                preceding[after] = left
                new_rank = rank_of((ids[left], ids[after]))
                if new_rank is not None:
                    heappush(heap, (new_rank, left))
            before = preceding[left]
            if before != -1:
                new_rank = rank_of((ids[before], ids[left]))
                if new_rank is not None:
                    heappush(heap, (new_rank, before))
        return [index for index in ids if index != -1]
