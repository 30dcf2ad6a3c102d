"""Formats and parity: HF tokenizer.json / transformers, GPT-2 files, tiktoken, MiniLM, chat template."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.assets import minilm_dir, shakespeare_play_files
from lmforge.errors import UserError
from lmforge.tokenizer import BPETokenizer, HFTokenizer, load_tokenizer, train_bpe, train_bpe_on_texts


# Any assigned unicode, plus the tricky bits. Surrogates are not valid text; unassigned code points
# (Cn in Python's Unicode database) are left out because the `regex` module's newer tables call
# some of them letters (U+3D000 is \p{L} in regex 2026.11) while HF tokenizers' older ones do not:
# they would test the Unicode versions, not the tokenizers.
ASSIGNED_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cn", "Cs")), max_size=10)
RANDOM_UNICODE = st.lists(st.one_of(ASSIGNED_TEXT, st.sampled_from(
    ["<|endoftext|>", "<|im_start|>", " ", "\n\n", "\r\n", "  \n ", "🤗", "中文", "'s", "'Re", "12345", "²"])),
    max_size=10).map("".join)


@pytest.fixture(scope="module")
def plays() -> list[str]:
    return [path.read_text(encoding="utf-8") for path in shakespeare_play_files()]


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    """A tokenizer trained once on all 42 plays, saved as an lmforge (= HF) directory."""
    directory = tmp_path_factory.mktemp("shakespeare_tokenizer")
    train_bpe(shakespeare_play_files(), vocab_size=2048, num_workers=2).save(directory)
    return directory


@pytest.fixture(scope="module")
def ours(shakespeare_dir) -> BPETokenizer:
    return load_tokenizer(shakespeare_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(shakespeare_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(shakespeare_dir / "tokenizer.json"))


def test_saved_directory_round_trips(shakespeare_dir, ours):
    assert sorted(path.name for path in shakespeare_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert isinstance(ours, BPETokenizer) and ours.vocab_size == 2048
    again = load_tokenizer(shakespeare_dir)
    assert again.fingerprint() == ours.fingerprint() and len(ours.fingerprint()) == 64
    assert again.chat_template == ours.chat_template and again.roles == ours.roles
    config = json.loads((shakespeare_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["chat_template"].startswith("{% for message")


def test_hf_tokenizers_gives_our_ids(ours, hf_tokenizer, plays):
    # HF encodes ~1 MB/s, so three plays (~400 KB) keep this quick; tiktoken below covers all 42.
    for play in plays[:3]:
        assert hf_tokenizer.encode(play).ids == ours.encode(play)
    text = "<|im_start|>user\nHow now, my lord?<|im_end|>\n<|endoftext|>"
    assert hf_tokenizer.encode(text).ids == ours.encode(text)
    assert hf_tokenizer.decode(ours.encode(text), skip_special_tokens=False) == text


@settings(max_examples=150, deadline=None)
@given(text=RANDOM_UNICODE)
def test_hf_and_tiktoken_agree_on_random_unicode(ours, hf_tokenizer, text):
    ids = ours.encode(text)
    assert hf_tokenizer.encode(text).ids == ids
    assert _tiktoken(ours).encode(text, allowed_special="all") == ids


_TIKTOKEN_CACHE: dict[str, object] = {}


def _tiktoken(tokenizer: BPETokenizer):
    key = tokenizer.fingerprint()
    if key not in _TIKTOKEN_CACHE:
        _TIKTOKEN_CACHE[key] = tokenizer.to_tiktoken()
    return _TIKTOKEN_CACHE[key]


def test_tiktoken_gives_our_ids_on_the_whole_corpus(ours, plays):
    encoding = _tiktoken(ours)
    corpus = "<|endoftext|>".join(plays)
    ids = ours.encode(corpus)
    assert encoding.encode(corpus, allowed_special="all") == ids
    assert encoding.decode(ids) == corpus == ours.decode(ids)


def test_transformers_fast_tokenizer_loads_the_directory(shakespeare_dir, ours, plays):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast.from_pretrained(str(shakespeare_dir))
    auto = AutoTokenizer.from_pretrained(str(shakespeare_dir))
    text = plays[0][:20000] + "<|endoftext|>" + plays[1][:20000]
    assert fast(text, add_special_tokens=True)["input_ids"] == ours.encode(text)
    assert auto.encode(text) == ours.encode(text)
    assert fast.eos_token == "<|endoftext|>" and fast.pad_token_id == ours.pad_id
    assert fast.mask_token_id == ours.mask_id


def test_chatml_template_matches_transformers(shakespeare_dir, ours):
    import jinja2
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who goes there?"}]
    rendered = jinja2.Template(ours.chat_template).render(messages=messages, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nSpeak in verse.<|im_end|>\n<|im_start|>user\nWho goes there?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    fast = PreTrainedTokenizerFast.from_pretrained(str(shakespeare_dir))
    hf_ids = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(hf_ids) == ours.encode(rendered)


@pytest.mark.parametrize("pattern, split_digits", [("gpt4", False), ("gpt2", True), ("gpt4", True)])
def test_other_pre_tokenizers_round_trip_through_hf(tmp_path, plays, pattern, split_digits):
    from tokenizers import Tokenizer

    corpus = plays[0][:60000] + " 2024 or 1,234,567 things\n\n  I'LL  "
    tokenizer = train_bpe_on_texts([corpus], vocab_size=600, pattern=pattern, split_digits=split_digits)
    tokenizer.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert (reloaded.pattern, reloaded.split_digits) == (tokenizer.pattern, tokenizer.split_digits)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [corpus, plays[2][:30000], "Call 555-0123 at 10:30; 42nd street\r\n\r\n\t x"]:
        assert hf.encode(text).ids == tokenizer.encode(text) == reloaded.encode(text)
    if not split_digits:
        encoding = tokenizer.to_tiktoken()
        assert encoding.encode(corpus, allowed_special="all") == tokenizer.encode(corpus)
    else:
        with pytest.raises(UserError, match="tiktoken"):
            tokenizer.to_tiktoken()


def test_gpt2_files_round_trip_and_load_in_hf(tmp_path, ours, plays):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab_path, merges_path = ours.save_gpt2_files(tmp_path)
    assert merges_path.read_text(encoding="utf-8").startswith("#version: 0.2\n")
    imported = BPETokenizer.from_gpt2_files(vocab_path, merges_path)
    assert imported.fingerprint() == ours.fingerprint()
    assert load_tokenizer(tmp_path).fingerprint() == ours.fingerprint()
    hf = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    text = plays[5][:50000]
    assert hf.encode(text).ids == imported.encode(text)


def test_imported_ids_need_not_follow_merge_order(tmp_path):
    # A GPT-2 style vocab where ids are shuffled: encoding follows merge ranks, not ids.
    vocab = {bytes([b]): 300 - b for b in range(256)}
    vocab[b"ab"] = 5
    vocab[b"abc"] = 1
    tokenizer = BPETokenizer(vocab, [(b"a", b"b"), (b"ab", b"c")], {"<|endoftext|>": 400})
    assert tokenizer.encode("abcab<|endoftext|>") == [1, 5, 400]
    assert tokenizer.decode([1, 5, 400]) == "abcab<|endoftext|>"
    assert tokenizer.vocab_size == 401
    reversed_ranks = BPETokenizer({**vocab, b"ab": 2, b"abc": 1}, [(b"a", b"b"), (b"ab", b"c")])
    with pytest.raises(UserError, match="merge order"):
        reversed_ranks.to_tiktoken()
    tokenizer.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("abcab") == [1, 5]


def test_minilm_wordpiece_loads_behind_the_same_contract(tmp_path):
    from tokenizers import Tokenizer

    tokenizer = load_tokenizer(minilm_dir())
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == 30522
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eot_id, tokenizer.mask_id) == (0, 101, 102, 103)
    reference = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    reference.no_truncation()
    text = "The capital of France is [MASK]. " * 100  # longer than the file's 128-token truncation
    ids = tokenizer.encode(text)
    assert len(ids) > 128 and ids.count(103) == 100
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert 103 not in tokenizer.encode("[MASK]", allow_special=False)
    assert tokenizer.encode("hello", add_special_tokens=True)[0] == 101
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    assert tokenizer.decode([7592, -1, 10**9]) == "hello"
    assert tokenizer.encode_batch(["a b", "c"]) == [tokenizer.encode("a b"), tokenizer.encode("c")]
    tokenizer.save(tmp_path)
    assert load_tokenizer(tmp_path).fingerprint() == tokenizer.fingerprint()


def test_missing_or_empty_tokenizer_locations_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tokenizer(tmp_path)


def test_lmforge_load_tokenizer_is_the_package_entry_point(shakespeare_dir):
    import lmforge

    assert lmforge.load_tokenizer(shakespeare_dir).vocab_size == 2048
