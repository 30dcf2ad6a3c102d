"""Encoding and decoding: round trips (hypothesis), specials, streaming, safe cuts, memory."""
from __future__ import annotations

import itertools
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import UserError
from lmforge.tokenizer import BPETokenizer, PreTokenizer, train_bpe_on_texts
from lmforge.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, split_at_safe_points

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|mask|>"]
_CORPUS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "Ünïcödé wörds, 中文字符和标点。 日本語のテキスト 🤗🚀👩‍👩‍👧 emoji\t\ttabs  and   spaces\r\n",
    "Numbers 1234567 and 3.14159, code: def f(x): return x**2  # comment\n\n\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return train_bpe_on_texts(_CORPUS * 3, vocab_size=400)


# Text mixing the hard parts: emoji (incl. ZWJ sequences), CJK, combining marks, control
# characters, all kinds of whitespace, digits, contractions, and special tokens.
_PARTS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(SPECIALS + ["<|endoftext", "|>", "<|", "'s", "'LL", " ", "  ", "\n", "\r\n", "\t", "\x00",
                                "\x1c", "\u3000", "\u00a0", "🤗", "👩‍👩‍👧", "中文", "é", "e\u0301", "123", "²"]),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF), max_size=5),
    st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=4),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=4),
)
MIXED_TEXT = st.lists(_PARTS, max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=MIXED_TEXT)
def test_decode_encode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, allow_special=False)) == text


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(min_value=-5, max_value=500), max_size=30))
def test_decode_never_raises(tokenizer, ids):
    text = tokenizer.decode(ids)
    assert isinstance(text, str)
    if any(index < 0 or index >= tokenizer.vocab_size for index in ids):
        assert "\ufffd" in text


def test_invalid_utf8_decodes_to_replacement_characters(tokenizer):
    # 0xE4 0xB8 starts a 3-byte character that never ends; 0xFF is never valid.
    ids = [tokenizer.vocab[b"\xe4"], tokenizer.vocab[b"\xb8"], tokenizer.vocab[b"a"], tokenizer.vocab[b"\xff"]]
    assert tokenizer.decode(ids) == "\ufffda\ufffd"
    assert tokenizer.decode([]) == ""


def test_special_tokens_become_ids_unless_disabled(tokenizer):
    eot = tokenizer.special_tokens["<|endoftext|>"]
    ids = tokenizer.encode("a<|endoftext|>b")
    assert ids.count(eot) == 1 and tokenizer.decode(ids) == "a<|endoftext|>b"
    plain = tokenizer.encode("a<|endoftext|>b", allow_special=False)
    assert eot not in plain and tokenizer.decode(plain) == "a<|endoftext|>b"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_special_tokens_match_longest_first():
    tokenizer = train_bpe_on_texts(["x y"], vocab_size=262, special_tokens=["<a>", "<a><b>", "<b>"])
    ids = tokenizer.encode("<a><b><a>")
    assert ids == [tokenizer.special_tokens["<a><b>"], tokenizer.special_tokens["<a>"]]


def test_encode_batch_and_helpers(tokenizer):
    texts = ["hello world", "", "<|im_start|>user\nhi<|im_end|>"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]
    assert tokenizer.token_to_id("<|im_end|>") == tokenizer.special_tokens["<|im_end|>"]
    assert tokenizer.token_to_id("e") == tokenizer.vocab[b"e"] == tokenizer.token_to_id(b"e")
    assert tokenizer.token_to_id("no such token at all") is None
    for index in tokenizer.encode("question 中"):
        assert tokenizer.id_to_bytes(index) in "question 中".encode("utf-8")
    with pytest.raises(ValueError, match="not in this tokenizer"):
        tokenizer.id_to_bytes(10**6)


def test_lone_surrogates_are_a_clear_error(tokenizer):
    with pytest.raises(UserError, match="surrogate"):
        tokenizer.encode("abc \ud800 def")


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(MIXED_TEXT, max_size=8), chunk_chars=st.integers(min_value=1, max_value=40))
def test_encode_iterable_equals_encoding_the_whole_text(tokenizer, lines, chunk_chars):
    assert list(tokenizer.encode_iterable(lines, chunk_chars=chunk_chars)) == tokenizer.encode("".join(lines))


_WHITESPACE_HEAVY = st.lists(st.sampled_from(["a", "Z", "é", "中", "1", "²", ".", "!", "_", "'", "'s", "'RE",
                                              " ", "  ", "\n", "\r", "\t", "\u3000", "\x1c", "\u0301", "<|x|>"]),
                             max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_WHITESPACE_HEAVY, split_digits=st.booleans(), pattern=st.sampled_from([GPT2_PATTERN, GPT4_PATTERN]))
def test_segments_and_safe_cuts_never_change_the_pieces(text, split_digits, pattern):
    pretokenizer = PreTokenizer(pattern, split_digits, ("<|x|>",))
    ordinary = text.replace("<|x|>", "")
    direct = pretokenizer.pieces(ordinary)
    assert [piece for segment in pretokenizer.segments(ordinary) for piece in pretokenizer.pieces(segment)] == direct

    def all_pieces(chunks):
        return [(run, special) if special else piece for chunk in chunks
                for run, special in pretokenizer.split_specials(chunk)
                for piece in ([run] if special else pretokenizer.pieces(run))]

    chunks = list(split_at_safe_points(list(text), pretokenizer, min_chars=3))
    assert "".join(chunks) == text
    assert all_pieces(chunks) == all_pieces([text])


def test_a_custom_regex_keeps_the_text_it_does_not_match():
    pretokenizer = PreTokenizer(r"\p{L}+", False, ())
    assert pretokenizer.pieces("ab, cd!") == ["ab", ", ", "cd", "!"]
    tokenizer = train_bpe_on_texts(["ab, cd! ab"], vocab_size=270, special_tokens=(), pattern=r"\p{L}+")
    assert tokenizer.decode(tokenizer.encode("ab, cd!")) == "ab, cd!"


def test_the_cache_stays_bounded(tokenizer):
    small = BPETokenizer(tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens, cache_size=50)
    rng = random.Random(0)
    for _ in range(20):
        text = " ".join("".join(rng.choice("abcdefgh") for _ in range(6)) for _ in range(30))
        assert small.encode(text) == tokenizer.encode(text)
    assert len(small._cache) <= 50 + 30


@pytest.mark.slow
def test_encode_iterable_memory_stays_flat_on_a_50_mb_file(tmp_path):
    psutil = pytest.importorskip("psutil")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzé中") for _ in range(rng.randint(2, 8))) for _ in range(800)]
    block = "".join(" ".join(rng.choice(words) for _ in range(12)) + ".\n" for _ in range(12_000))  # ~1 MB
    tokenizer = train_bpe_on_texts([block[:300_000]], vocab_size=2048)  # mostly whole words: few ids to count
    repeats = 50_000_000 // len(block.encode("utf-8")) + 1
    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(repeats):
            handle.write(block)
    assert path.stat().st_size >= 50_000_000

    process = psutil.Process(os.getpid())
    rss, count = [], 0
    with open(path, encoding="utf-8") as handle:
        ids = tokenizer.encode_iterable(handle)
        while True:
            batch = len(list(itertools.islice(ids, 1_000_000)))  # consume, keep at most 1M at a time
            count += batch
            rss.append(process.memory_info().rss)
            if batch < 1_000_000:
                break
    # GPT-2 cuts ".\n" + "word" into ".", "\n", "word" whether or not the text ends after "\n",
    # so the stream's ids are exactly the block's ids repeated.
    assert count == repeats * len(tokenizer.encode(block))
    # Holding the file (50 MB) or its ids (~14M ints, > 100 MB as a list) would grow RSS by far more.
    growth = max(rss) - rss[0]
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB while streaming"
