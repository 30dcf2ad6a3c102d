"""Long pre-tokens (BPE in O(n log n)), and bad tokenizer files or inputs as clear UserErrors."""
from __future__ import annotations

import json
import random
import time
from itertools import pairwise, repeat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge import cli
from lmforge.errors import UserError
from lmforge.tokenizer import BPETokenizer, load_tokenizer, train_bpe_on_texts

_TEXTS = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20,
          "aaaa abab aaab baaa bbbb abba " * 30]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe_on_texts(_TEXTS, vocab_size=500).save(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> BPETokenizer:
    return load_tokenizer(tokenizer_dir)


def quadratic_bpe(tokenizer: BPETokenizer, piece: bytes) -> list[int]:
    """The reference rule, spelled out: merge the lowest-rank adjacent pair, leftmost first."""
    ids = [tokenizer.vocab[bytes([byte])] for byte in piece]
    while len(ids) > 1:
        ranks = list(map(tokenizer._rank_of.get, pairwise(ids), repeat(float("inf"))))
        best = min(ranks)
        if best == float("inf"):
            break
        position = ranks.index(best)
        ids[position:position + 2] = [tokenizer._merged_id[best]]
    return ids


@settings(max_examples=300, deadline=None)
@given(piece=st.text(alphabet="abeotsh", min_size=1, max_size=80))
def test_long_piece_merge_order_equals_the_reference_rule(tokenizer, piece):
    # Few letters, many repeats: plenty of equal-rank and overlapping pairs ("aaaa") to break ties.
    data = piece.encode("utf-8")
    assert tokenizer._bpe(data) == quadratic_bpe(tokenizer, data)
    assert tokenizer._bpe_long([tokenizer.vocab[bytes([byte])] for byte in data]) == quadratic_bpe(tokenizer, data)


def test_a_20k_char_run_without_spaces_is_fast_and_matches_hf(tokenizer_dir, tokenizer):
    from tokenizers import Tokenizer

    rng = random.Random(0)
    run = "".join(rng.choice("abeotshnriq") for _ in range(20_000))
    start = time.perf_counter()
    ids = tokenizer.encode(run)
    seconds = time.perf_counter() - start
    # The old quadratic loop took 4-15 s here (machine-dependent); the heap takes about 0.01 s.
    assert seconds < 1.0, f"encoding a 20K-char pre-token took {seconds:.1f} s"
    assert len(ids) < len(run)  # merges did happen
    hf = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert ids == hf.encode(run).ids
    assert tokenizer.decode(ids) == run


# --- bad tokenizer files ----------------------------------------------------------------------

def _write(directory, tokenizer_json, config=None):
    directory.mkdir()
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.mark.parametrize("mangle", [
    lambda doc: [1, 2],
    lambda doc: {**doc, "added_tokens": [{"id": 1}]},
    lambda doc: {**doc, "added_tokens": {"content": "<|endoftext|>"}},
    lambda doc: {**doc, "model": [1]},
    lambda doc: {**doc, "model": {**doc["model"], "vocab": [1, 2]}},
    lambda doc: {**doc, "model": {**doc["model"], "merges": 5}},
    lambda doc: {**doc, "pre_tokenizer": {"type": "Sequence"}},
    lambda doc: {**doc, "pre_tokenizer": "ByteLevel"},
], ids=["list", "added-without-content", "added-not-a-list", "model-list", "vocab-list", "merges-int",
        "sequence-without-steps", "pre-tokenizer-string"])
def test_wrongly_shaped_tokenizer_json_is_a_user_error(tokenizer_dir, tmp_path, mangle):
    document = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    directory = _write(tmp_path / "bad", mangle(document))
    with pytest.raises(UserError, match=r"tokenizer.json.*re-export"):
        load_tokenizer(directory)


def test_wrongly_shaped_tokenizer_config_is_a_user_error(tokenizer_dir, tmp_path):
    document = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    directory = _write(tmp_path / "bad", document, config=["not", "an", "object"])
    with pytest.raises(UserError, match=r"tokenizer_config.json.*re-export"):
        load_tokenizer(directory)


def test_no_tokenizer_error_names_the_location(tmp_path):
    with pytest.raises(UserError, match="holds no tokenizer") as caught:
        load_tokenizer(tmp_path)
    assert "{location}" not in str(caught.value)
    assert f"--out {tmp_path}" in str(caught.value)


def test_stats_on_a_non_utf8_file_is_a_user_error(tokenizer_dir, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
    assert cli.main(["tokenizer", "stats", "--tokenizer", str(tokenizer_dir), "--input", str(latin1)]) == 2
    error = capsys.readouterr().err
    assert "latin1.txt' is not UTF-8 text" in error and "Traceback" not in error
