"""Training a byte-level BPE vocabulary from text files.

Two phases:

1. Count pieces. Files are streamed in chunks cut at safe points (see `pretokenize`), worker
   processes pre-tokenize the chunks in parallel, and the main process adds up their counts.
   Memory holds a few chunks plus the table of distinct pieces, never a whole file.
2. Learn merges on the table `piece bytes -> count`. Each piece is a sequence of token ids (bytes at
   first). We keep, for every adjacent pair, its total count and the set of pieces it occurs in.
   A merge rewrites only the pieces that contain the pair and updates the counts of the pairs it
   removes and creates; there is never a full recount. The best pair comes from a max-heap with
   lazy invalidation: entries are not removed when a count drops; a popped entry whose count is
   out of date is pushed back with the current count instead.

Ordering rule (deterministic): the most frequent pair wins; ties go to the lexicographically
greatest pair, comparing (left bytes, right bytes).
"""
from __future__ import annotations

import heapq
import operator
import os
from collections import Counter, defaultdict
from functools import partial
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

from ..errors import UserError
from ..workers import ordered_map
from .pretokenize import PreTokenizer, resolve_pattern, split_at_safe_points
from .special_tokens import DEFAULT_SPECIAL_TOKENS

if TYPE_CHECKING:
    from .bpe import BPETokenizer

# The heap is a min-heap, so "greatest bytes first" needs a key that sorts in reverse byte order:
# map byte c to chr(255 - c) and end with chr(256), which sorts after every mapped byte (so a
# token sorts after its own extensions, as b"ab" > b"a" requires).
_REVERSE_BYTES = {byte: 255 - byte for byte in range(256)}


def _descending_key(token: bytes) -> str:
    return token.decode("latin-1").translate(_REVERSE_BYTES) + "\u0100"


# ---------------------------------------------------------------------------------------------
# Phase 1: counting pre-tokenized pieces, in parallel, streaming.

_worker_pretokenizer: PreTokenizer | None = None


def _init_worker(pattern: str, split_digits: bool, special_tokens: tuple[str, ...]) -> None:
    """Each spawned worker compiles the pre-tokenizer once (plain arguments pickle simply)."""
    global _worker_pretokenizer
    _worker_pretokenizer = PreTokenizer(pattern, split_digits, special_tokens)


def count_pieces_in_texts(texts: Iterable[str], pretokenizer: PreTokenizer) -> dict[str, int]:
    """How often each pre-token occurs; special tokens are cut out and not counted.

    Text is first cut into segments (mostly one word each, see `pretokenize`) and counted with
    C-level Counter.update; the slow regex then runs once per *distinct* segment.
    """
    segment_counts: Counter[str] = Counter()
    for text in texts:
        for run, is_special in pretokenizer.split_specials(text):
            if run and not is_special:
                segment_counts.update(pretokenizer.segments(run))
    if not pretokenizer.is_builtin:
        return dict(segment_counts)  # for a custom regex the segments are the pieces
    piece_counts: dict[str, int] = defaultdict(int)
    for segment, count in segment_counts.items():
        for piece in pretokenizer.pieces(segment):
            piece_counts[piece] += count
    return piece_counts


def _count_task(texts: list[str]) -> dict[str, int]:
    assert _worker_pretokenizer is not None
    return count_pieces_in_texts(texts, _worker_pretokenizer)


def _read_blocks(path: Path, block_chars: int) -> Iterator[str]:
    try:
        # newline="" keeps "\r\n" as it is in the file: the tokenizer sees the real text.
        with open(path, encoding="utf-8", newline="") as handle:
            yield from iter(partial(handle.read, block_chars), "")
    except UnicodeDecodeError as error:
        raise UserError(f"input file '{path}' is not UTF-8 text ({error.reason} at byte {error.start}); "
                        "convert it to UTF-8 first") from None


def _tasks(files: Sequence[Path], pretokenizer: PreTokenizer, task_chars: int) -> Iterator[list[str]]:
    """Chunks of about task_chars, each a list of texts cut at safe points, never across files."""
    batch: list[str] = []
    size = 0
    for path in files:
        for text in split_at_safe_points(_read_blocks(path, task_chars), pretokenizer, task_chars):
            batch.append(text)
            size += len(text)
            if size >= task_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def count_pieces(files: Sequence[Path], pretokenizer: PreTokenizer, num_workers: int,
                 task_chars: int = 1 << 20) -> dict[str, int]:
    """Stream the files and count pre-tokens with `num_workers` processes (1 = in this process)."""
    tasks = _tasks(files, pretokenizer, task_chars)
    if num_workers <= 1:
        return count_pieces_in_texts(chain.from_iterable(tasks), pretokenizer)
    total: dict[str, int] = defaultdict(int)
    # At most two tasks per worker in flight, so reading never runs far ahead of counting.
    for _, counts in ordered_map(_count_task, tasks, num_workers, _init_worker,
                                 (pretokenizer.pattern, pretokenizer.split_digits, pretokenizer.special_tokens)):
        for piece, count in counts.items():
            total[piece] += count
    return total


# ---------------------------------------------------------------------------------------------
# Phase 2: learning merges.

def learn_merges(word_counts: Mapping[bytes, int], num_merges: int,
                 progress: Callable[[int], None] | None = None) -> list[tuple[bytes, bytes]]:
    """Learn up to num_merges merges from `piece bytes -> count`; returns them in order.

    Token ids during training: 0..255 are the bytes, 256 + i is the i-th merge. A piece is
    stored as a str with one character per token id (chr(id)), so that merging a pair in it is
    one C-level `str.replace`, and a pair is the 2-character string of its two ids.
    """
    token_bytes = [bytes([byte]) for byte in range(256)]
    sort_key = [_descending_key(token) for token in token_bytes]
    words = [word.decode("latin-1") for word in word_counts]  # latin-1 maps byte b to chr(b)
    counts = list(word_counts.values())

    pair_counts: dict[str, int] = defaultdict(int)
    pair_words: dict[str, list[int]] = defaultdict(list)  # pair -> pieces that (may) hold it
    for index, (word, count) in enumerate(zip(words, counts)):
        for pair in map(operator.add, word, word[1:]):  # "abc" -> "ab", "bc"
            pair_counts[pair] += count
            pair_words[pair].append(index)

    def heap_entry(pair: str) -> tuple[int, str, str, str]:
        # Most frequent first, then the greatest (left bytes, right bytes).
        return -pair_counts[pair], sort_key[ord(pair[0])], sort_key[ord(pair[1])], pair

    heap = [heap_entry(pair) for pair in pair_counts]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    while heap and len(merges) < num_merges:
        negative_count, _, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative_count:
            # Stale: the count dropped after this entry was pushed. Re-queue the true count.
            if pair_counts.get(pair, 0) > 0:
                heapq.heappush(heap, heap_entry(pair))
            continue

        left, right = pair
        new_id = len(token_bytes)
        merged = chr(new_id)
        token_bytes.append(token_bytes[ord(left)] + token_bytes[ord(right)])
        sort_key.append(_descending_key(token_bytes[new_id]))
        merges.append((token_bytes[ord(left)], token_bytes[ord(right)]))

        # Rewrite the pieces holding the pair. Only pairs next to a merged spot change: for each
        # new token in a piece, its old neighbour pairs lose the piece's count, new ones gain it.
        created: dict[str, list[int]] = defaultdict(list)  # pairs with the new token (all brand new)
        for index in pair_words.pop(pair):
            word = words[index]
            new_word = word.replace(pair, merged)
            if len(new_word) == len(word):
                continue  # the index is lazy (and may repeat a piece): the pair is already gone
            words[index] = new_word
            count = counts[index]
            last = len(new_word) - 1
            position = new_word.find(merged)
            while position != -1:
                if position > 0:
                    before = new_word[position - 1]
                    # (before, left) is gone; if before is itself a new token, it was (right, left).
                    pair_counts[(right if before == merged else before) + left] -= count
                    new_pair = before + merged
                    pair_counts[new_pair] += count
                    created[new_pair].append(index)
                if position < last and new_word[position + 1] != merged:
                    after = new_word[position + 1]
                    pair_counts[right + after] -= count
                    new_pair = merged + after
                    pair_counts[new_pair] += count
                    created[new_pair].append(index)
                position = new_word.find(merged, position + 1)
        del pair_counts[pair]
        pair_words.update(created)
        # Only pairs holding the new token grew, so only they need fresh heap entries.
        for new_pair in created:
            heapq.heappush(heap, heap_entry(new_pair))
        if progress is not None:
            progress(len(merges))
    return merges


# ---------------------------------------------------------------------------------------------
# The public entry points.

def _check_vocab_size(vocab_size: int, special_tokens: Sequence[str]) -> int:
    """The number of merges to learn."""
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise UserError(f"vocabulary size {vocab_size} is too small: it must hold the 256 byte tokens and "
                        f"{len(special_tokens)} special tokens; use --vocab-size {smallest} or more")
    if vocab_size > 1_000_000:  # training writes token ids as characters, chr() stops at 0x10FFFF
        raise UserError(f"vocabulary size {vocab_size} is above the supported 1,000,000; use a smaller --vocab-size")
    return vocab_size - smallest


def _pretokenizer(pattern: str, split_digits: bool, special_tokens: Sequence[str]) -> PreTokenizer:
    specials = tuple(dict.fromkeys(special_tokens))  # drop repeats, keep order
    if any(not token for token in specials):
        raise UserError("a special token is the empty string; give non-empty special tokens")
    try:
        return PreTokenizer(resolve_pattern(pattern), split_digits, specials)
    except ValueError as error:
        raise UserError(f"{error}; pass --pattern gpt2, gpt4 or a valid regex") from None


def _learn(piece_counts: Mapping[str, int], vocab_size: int, pretokenizer: PreTokenizer,
           progress: Callable[[int], None] | None) -> "BPETokenizer":
    from .bpe import BPETokenizer

    word_counts = {piece.encode("utf-8"): count for piece, count in piece_counts.items()}
    merges = learn_merges(word_counts, _check_vocab_size(vocab_size, pretokenizer.special_tokens), progress)
    return BPETokenizer.from_merges(merges, special_tokens=pretokenizer.special_tokens,
                                    pattern=pretokenizer.pattern, split_digits=pretokenizer.split_digits)


def train_bpe(files: Sequence[str | os.PathLike], vocab_size: int,
              special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, pattern: str = "gpt2",
              split_digits: bool = False, num_workers: int | None = None,
              progress: Callable[[int], None] | None = None) -> "BPETokenizer":
    """Train a byte-level BPE tokenizer on UTF-8 text files (each file is a document).

    vocab_size counts everything: 256 bytes + merges + special tokens, and ids follow that order
    (a merged token's id is 256 + its rank). `pattern` is "gpt2", "gpt4" or a regex. num_workers
    defaults to all cores (inputs under 1 MB are counted in this process). progress, if given,
    is called with the number of merges learned so far.
    """
    pretokenizer = _pretokenizer(pattern, split_digits, special_tokens)
    _check_vocab_size(vocab_size, pretokenizer.special_tokens)
    paths = [Path(file) for file in files]
    if not paths:
        raise UserError("no input files given; pass one or more text files with --input")
    for path in paths:
        if not path.is_file():
            raise UserError(f"input file '{path}' does not exist; check the path")
        if path.stat().st_size == 0:
            raise UserError(f"input file '{path}' is empty; give a file with text in it")
    total_bytes = sum(path.stat().st_size for path in paths)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    workers = 1 if total_bytes < (1 << 20) else workers
    piece_counts = count_pieces(paths, pretokenizer, workers, task_chars=_task_chars(total_bytes, workers))
    return _learn(piece_counts, vocab_size, pretokenizer, progress)


def _task_chars(total_bytes: int, workers: int) -> int:
    """About two tasks per worker: each task re-runs the regex on its own distinct segments, so
    fewer, bigger tasks repeat less work; capped so that memory stays bounded on huge files."""
    return max(1 << 16, min(1 << 22, total_bytes // (2 * max(workers, 1)) + 1))


def train_bpe_on_texts(texts: Iterable[str], vocab_size: int,
                       special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, pattern: str = "gpt2",
                       split_digits: bool = False, progress: Callable[[int], None] | None = None) -> "BPETokenizer":
    """Train on in-memory strings (each one a document), in this process."""
    pretokenizer = _pretokenizer(pattern, split_digits, special_tokens)
    _check_vocab_size(vocab_size, pretokenizer.special_tokens)
    return _learn(count_pieces_in_texts(texts, pretokenizer), vocab_size, pretokenizer, progress)
