"""BPE training: hand-computed merges, tie-breaking, incremental counts, streaming, bad input."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from lmforge.errors import UserError
from lmforge.tokenizer import PreTokenizer, learn_merges, train_bpe, train_bpe_on_texts
from lmforge.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN
from lmforge.tokenizer.train import count_pieces, count_pieces_in_texts


def _naive_merges(word_counts: dict[bytes, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """Reference BPE: recount every pair from scratch before each merge."""
    words = {tuple(bytes([b]) for b in word): count for word, count in word_counts.items()}
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged_words = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged_words[tuple(out)] = merged_words.get(tuple(out), 0) + count
        words = merged_words
    return merges


def test_merges_match_a_hand_computed_sequence():
    # Words (each text is one document, one pre-token): low x5, lower x2, widest x3, newest x6.
    # Pair counts: es 9, st 9 -> tie, ("s","t") > ("e","s") so "st" first; then e+st 9;
    # lo 7 / ow 7 -> "ow" (o > l); l+ow 7; then ne 6, ew 6, w+est 6 -> "w est" (w > n > e);
    # n+e 6 beats e+west 6 (n > e); ne+west; then widest: w+i, wi+d, wid+est (3 each, leftmost
    # is greatest); then lower: low+e 2 beats e+r 2 (b"low" > b"e"); lowe+r.
    texts = ["low"] * 5 + ["lower"] * 2 + ["widest"] * 3 + ["newest"] * 6
    tokenizer = train_bpe_on_texts(texts, vocab_size=256 + 12, special_tokens=())
    assert tokenizer.merges == [
        (b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"), (b"n", b"e"),
        (b"ne", b"west"), (b"w", b"i"), (b"wi", b"d"), (b"wid", b"est"), (b"low", b"e"), (b"lowe", b"r"),
    ]
    # ids: bytes in byte order, then merges in order, so a token's id is its merge rank + 256.
    assert tokenizer.vocab[b"st"] == 256 and tokenizer.vocab[b"lower"] == 267
    # " lower" is one piece, but no merge starts with a space here: [" ", "lower"].
    assert tokenizer.encode("newest lower") == [262, 32, 267]


def test_overlapping_pairs_merge_left_to_right():
    # "aaaa" has the pair (a, a) three times but merging left to right gives "aa aa".
    tokenizer = train_bpe_on_texts(["aaaa"], vocab_size=258, special_tokens=())
    assert tokenizer.merges == [(b"a", b"a"), (b"aa", b"aa")]
    assert tokenizer.encode("aaaaa") == [257, 97]


@pytest.mark.parametrize("seed", range(4))
def test_incremental_counts_equal_a_full_recount(seed):
    rng = random.Random(seed)
    alphabet = [b"a", b"b", b"c", b"ab", b"\xc3\xa9", b" "]
    word_counts = {b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))): rng.randint(1, 6)
                   for _ in range(80)}
    assert learn_merges(word_counts, 60) == _naive_merges(word_counts, 60)


def test_training_is_deterministic_and_special_tokens_are_never_merged():
    texts = ["to be or not to be<|endoftext|>that is the question<|endoftext|>" * 3, "be<|im_end|>be"]
    first = train_bpe_on_texts(texts, vocab_size=300)
    second = train_bpe_on_texts(list(texts), vocab_size=300)
    assert first.merges == second.merges and first.fingerprint() == second.fingerprint()
    assert not any(b"<|" in left + right for left, right in first.merges)  # specials are not counted
    ids = first.encode("be<|endoftext|>be")
    assert first.special_tokens["<|endoftext|>"] in ids and first.decode(ids) == "be<|endoftext|>be"


def test_vocabulary_layout_and_roles():
    tokenizer = train_bpe_on_texts(["hello hello world"], vocab_size=270)
    specials = tokenizer.special_tokens
    assert tokenizer.vocab_size == 256 + len(tokenizer.merges) + 5
    assert list(specials) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|mask|>"]
    assert sorted(specials.values()) == list(range(256 + len(tokenizer.merges), tokenizer.vocab_size))
    assert tokenizer.eot_id == specials["<|endoftext|>"] and tokenizer.pad_id == specials["<|pad|>"]
    assert tokenizer.mask_id == specials["<|mask|>"] and tokenizer.bos_id is None
    custom = train_bpe_on_texts(["hello"], vocab_size=260, special_tokens=["<s>", "</s>"])
    assert custom.special_tokens == {"<s>": 258, "</s>": 259} and custom.mask_id is None
    assert custom.chat_template is None and tokenizer.chat_template is not None


def test_stops_early_when_pairs_run_out():
    tokenizer = train_bpe_on_texts(["abc"], vocab_size=1000, special_tokens=())
    assert tokenizer.merges == [(b"b", b"c"), (b"a", b"bc")]
    assert tokenizer.vocab_size == 258


def test_streamed_chunks_count_like_the_whole_text(tmp_path):
    text = ("  Enter HAMLET.\n\nHam. To be, or not to be: that's the question!\r\n"
            "<|endoftext|>Third   act 1234 x²<|endoftext|>\n\t end  ") * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8", newline="")
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        pretokenizer = PreTokenizer(pattern, False, ("<|endoftext|>",))
        whole = count_pieces_in_texts([text], pretokenizer)
        assert count_pieces([path], pretokenizer, num_workers=1, task_chars=37) == whole
        assert count_pieces([path], pretokenizer, num_workers=2, task_chars=500) == whole


def test_train_bpe_on_files_matches_training_in_memory(tmp_path):
    documents = ["The quick brown fox.\nJumps over the lazy dog!", "Pack my box with five dozen liquor jugs."]
    paths = []
    for index, document in enumerate(documents):
        paths.append(tmp_path / f"doc{index}.txt")
        paths[-1].write_text(document, encoding="utf-8")
    from_files = train_bpe(paths, vocab_size=300, num_workers=1)
    in_memory = train_bpe_on_texts(documents, vocab_size=300)
    assert from_files.merges == in_memory.merges


def test_gpt4_pattern_and_digit_splitting_change_the_pieces():
    text = ["I'LL pay 12345 dollars\n\n"] * 5
    gpt2 = train_bpe_on_texts(text, vocab_size=300, special_tokens=(), pattern="gpt2")
    gpt4 = train_bpe_on_texts(text, vocab_size=300, special_tokens=(), pattern="gpt4")
    digits = train_bpe_on_texts(text, vocab_size=300, special_tokens=(), split_digits=True)
    tokens = {name: {left + right for left, right in tok.merges} for name, tok in
              [("gpt2", gpt2), ("gpt4", gpt4), ("digits", digits)]}
    assert b" 12345" in tokens["gpt2"] and b"'" + b"LL" not in tokens["gpt2"]
    assert {b"123", b"45", b"'LL"} <= tokens["gpt4"]  # digits in threes, contractions of any case
    assert not any(sum(c in b"0123456789" for c in token) > 1 for token in tokens["digits"])


@pytest.mark.parametrize("vocab_size", [0, 255, 260])
def test_vocabulary_smaller_than_bytes_plus_specials_is_refused(vocab_size, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text", encoding="utf-8")
    with pytest.raises(UserError, match="too small.*261"):
        train_bpe([path], vocab_size=vocab_size)


def test_missing_and_empty_inputs_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        train_bpe([empty], vocab_size=300)
    with pytest.raises(UserError, match="no input files"):
        train_bpe([], vocab_size=300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        train_bpe([latin1], vocab_size=300)
