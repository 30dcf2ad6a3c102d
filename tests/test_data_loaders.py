"""Loaders on hand-written shards: CLM shift, BERT masking statistics, determinism, resume, ranks, eval."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.data.loaders import IGNORE_INDEX, CausalLMLoader, Masking, MaskedLMLoader, iter_eval_batches
from lmforge.data.shards import ShardMeta, SplitStats, read_meta
from lmforge.errors import UserError
from lmforge.io import write_json_atomic

SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258, "<|pad|>": 259, "<|mask|>": 260}
VOCAB = 400


def write_shards(directory, train: np.ndarray, val: np.ndarray, vocab_size: int = VOCAB) -> None:
    """A shard directory as `prepare_shards` would write it, with the given token arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, tokens in (("train", train), ("val", val)):
        tokens.astype(np.uint16).tofile(directory / f"{name}.bin")
        splits[name] = SplitStats(f"{name}.bin", tokens=len(tokens), documents=1, bytes=len(tokens),
                                  max_token_id=int(tokens.max()))
    meta = ShardMeta(tokenizer_fingerprint="f" * 64, tokenizer="hand-written", vocab_size=vocab_size, dtype="uint16",
                     eot_id=256, special_tokens=SPECIALS, source={"kind": "test"}, val_fraction=0.1,
                     train=splits["train"], val=splits["val"], val_document_names=None,
                     created_at="2026-01-01T00:00:00+00:00", lmforge_version="0")
    write_json_atomic(directory / "meta.json", meta.to_json())


@pytest.fixture(scope="module")
def counting_shards(tmp_path_factory):
    """Token i is the number i: a window's content tells where it starts."""
    directory = tmp_path_factory.mktemp("counting")
    write_shards(directory, np.arange(20_000), np.arange(1_000), vocab_size=20_000)
    return directory


@pytest.fixture(scope="module")
def text_like_shards(tmp_path_factory):
    """Random ordinary tokens with an end-of-text token every 50 positions."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=50_000)
    train[::50] = SPECIALS["<|endoftext|>"]
    directory = tmp_path_factory.mktemp("text_like")
    write_shards(directory, train, train[:5_000])
    return directory


def test_causal_batches_are_contiguous_windows_with_labels_shifted_by_one(counting_shards):
    batch = CausalLMLoader(counting_shards, "train", batch_size=8, seq_len=32, seed=0).next_batch()
    inputs, labels = batch["input_ids"], batch["labels"]
    assert inputs.shape == labels.shape == (8, 32) and inputs.dtype == labels.dtype == torch.long
    starts = inputs[:, :1]
    assert torch.equal(inputs, starts + torch.arange(32))  # a contiguous slice of the shard
    assert torch.equal(labels, inputs + 1)  # labels[t] is the token after inputs[t]
    assert int(inputs.max()) + 1 <= 20_000 - 1  # the last window still has its label


def test_a_bin_path_selects_its_split(counting_shards):
    batch = CausalLMLoader(counting_shards / "val.bin", "train", batch_size=64, seq_len=8, seed=0).next_batch()
    assert int(batch["labels"].max()) < 1_000  # read from val.bin (1,000 tokens), not train.bin


def test_same_seed_same_batches_other_seed_other_batches(counting_shards):
    first, second, other = (CausalLMLoader(counting_shards, "train", 4, 16, seed=s) for s in (1, 1, 2))
    for _ in range(3):
        a, b, c = first.next_batch(), second.next_batch(), other.next_batch()
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert not torch.equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_restored_loader_yields_exactly_the_same_batches(text_like_shards, kind):
    make = (lambda: CausalLMLoader(text_like_shards, "train", 4, 32, seed=7)) if kind == "causal" else \
        (lambda: MaskedLMLoader(text_like_shards, "train", 4, 32, seed=7))
    original = make()
    for _ in range(3):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # checkpoints store it as plain data
    expected = [original.next_batch() for _ in range(2)]

    resumed = make()
    resumed.next_batch()  # a fresh loader's position must not leak into the restored stream
    resumed.load_state_dict(state)
    assert resumed.state_dict() == {"seed": 7, "step": 3}
    for want in expected:
        got = resumed.next_batch()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_ranks_draw_different_streams_from_the_same_seed(counting_shards):
    ranks = [CausalLMLoader(counting_shards, "train", 8, 16, seed=3, rank=r, world_size=2) for r in (0, 1)]
    starts = [set(), set()]
    for _ in range(20):
        batches = [loader.next_batch()["input_ids"] for loader in ranks]
        assert not torch.equal(batches[0], batches[1])
        for rank, batch in enumerate(batches):
            starts[rank].update(batch[:, 0].tolist())
    # Independent uniform draws of 160 starts from ~20,000 share only a few by chance.
    assert len(starts[0] & starts[1]) < 10
    # Rank 0 of a 2-process job reads what a single process reads: a resumed run can change world size.
    single = CausalLMLoader(counting_shards, "train", 8, 16, seed=3)
    again = CausalLMLoader(counting_shards, "train", 8, 16, seed=3, rank=0, world_size=2)
    assert torch.equal(single.next_batch()["input_ids"], again.next_batch()["input_ids"])
    with pytest.raises(UserError, match="rank 2 is outside world_size 2"):
        CausalLMLoader(counting_shards, "train", 8, 16, seed=3, rank=2, world_size=2)


def test_masking_follows_bert_15_percent_and_80_10_10(text_like_shards):
    loader = MaskedLMLoader(text_like_shards, "train", batch_size=64, seq_len=512, seed=0)
    batch = loader.next_batch()
    inputs, labels = batch["input_ids"], batch["labels"]
    assert torch.equal(batch["attention_mask"], torch.ones_like(inputs))
    original = torch.where(labels == IGNORE_INDEX, inputs, labels)  # unchosen positions are unchanged
    special = original == SPECIALS["<|endoftext|>"]
    chosen = labels != IGNORE_INDEX

    assert special.sum() > 500 and not chosen[special].any()  # special tokens are never chosen
    assert torch.equal(inputs[~chosen], original[~chosen])
    assert abs(chosen.sum().item() / (~special).sum().item() - 0.15) < 0.01

    masked = chosen & (inputs == SPECIALS["<|mask|>"])
    unchanged = chosen & (inputs == labels)
    replaced = chosen & ~masked & ~unchanged
    n_chosen = chosen.sum().item()
    assert abs(masked.sum().item() / n_chosen - 0.8) < 0.03
    assert abs(replaced.sum().item() / n_chosen - 0.1) < 0.02
    # Unchanged: 10%, plus the rare random draw that hits the original token.
    assert abs(unchanged.sum().item() / n_chosen - 0.1) < 0.02
    # Random replacements are ordinary tokens, spread over the vocabulary (not specials).
    random_tokens = inputs[replaced]
    assert not torch.isin(random_tokens, torch.tensor(list(SPECIALS.values()))).any()
    assert random_tokens.max() > 300  # drawn from the whole vocabulary (400), not just from the text


def test_masked_loader_takes_its_defaults_from_the_shards(text_like_shards):
    loader = MaskedLMLoader(text_like_shards, "train", 2, 8, seed=0)
    assert loader.masking == Masking(mask_id=260, vocab_size=VOCAB, special_ids=(256, 257, 258, 259, 260))
    custom = MaskedLMLoader(text_like_shards, "train", 2, 8, seed=0, mask_id=259, vocab_size=300,
                            special_ids=[256], mask_prob=0.5)
    assert custom.masking == Masking(259, 300, (256,), 0.5)
    with pytest.raises(UserError, match="mask token id 500 is outside the vocabulary of 400"):
        MaskedLMLoader(text_like_shards, "train", 2, 8, seed=0, mask_id=500)


def test_eval_batches_cover_the_split_once_in_order(counting_shards):
    batches = list(iter_eval_batches(counting_shards, "val", batch_size=4, seq_len=64))
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 4, 3]  # (1000 - 1) // 64 = 15 windows
    inputs = torch.cat([b["input_ids"] for b in batches]).flatten()
    labels = torch.cat([b["labels"] for b in batches]).flatten()
    assert torch.equal(inputs, torch.arange(15 * 64))
    assert torch.equal(labels, inputs + 1)
    assert len(list(iter_eval_batches(counting_shards, "val", 4, 64, max_batches=2))) == 2

    by_rank = [torch.cat([b["input_ids"] for b in iter_eval_batches(counting_shards, "val", 4, 64, rank=r,
                                                                    world_size=2)]) for r in (0, 1)]
    assert len(by_rank[0]) == 8 and len(by_rank[1]) == 7
    assert torch.equal(torch.cat(by_rank)[:, 0].sort().values, torch.arange(15) * 64)


def test_masked_eval_batches_are_the_same_on_every_call(text_like_shards):
    masking = Masking.from_meta(read_meta(text_like_shards))
    first = list(iter_eval_batches(text_like_shards, "val", 4, 128, masking=masking))
    second = list(iter_eval_batches(text_like_shards, "val", 4, 128, masking=masking))
    assert len(first) == 10 and sum(len(b["input_ids"]) for b in first) == 5_000 // 128
    for a, b in zip(first, second):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert (first[0]["labels"] != IGNORE_INDEX).any()


def test_loader_errors_are_clear(counting_shards, tmp_path):
    with pytest.raises(UserError, match=r"val split .* has 1000 tokens, fewer than one window of 1001"):
        CausalLMLoader(counting_shards, "val", 1, 1000, seed=0)
    with pytest.raises(UserError, match="split 'test' does not exist"):
        CausalLMLoader(counting_shards, "test", 1, 8, seed=0)
    with pytest.raises(UserError, match="has no meta.json"):
        CausalLMLoader(tmp_path, "train", 1, 8, seed=0)
    damaged = tmp_path / "damaged"
    write_shards(damaged, np.arange(100), np.arange(50))
    with open(damaged / "train.bin", "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(UserError, match="the shard is damaged"):
        CausalLMLoader(damaged, "train", 1, 8, seed=0)
