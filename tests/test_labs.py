"""Learning aids: attention capture, head summaries, heatmaps, and the inputs/outputs report."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from lmforge.errors import UserError
from lmforge.labs.attention import (HeadSummary, attention_modules, capture_attention, draw_attention_grid,
                                    pick_layer, summarize_heads)
from lmforge.labs.common import encode_for_model, model_inputs, require_tokenizer, token_label
from lmforge.labs.model_io import IGNORE_INDEX, inspect_io, render_io
from lmforge.model.loading import load

TEXT = "the cat sat on the mat and the dog sat on the log"


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.tokenizer import train_bpe_on_texts

    return train_bpe_on_texts([TEXT + ". a cat, a dog."] * 10, vocab_size=290)


@pytest.fixture(scope="module")
def gpt(tokenizer):
    return load("nano", tokenizer=tokenizer)[0]


@pytest.fixture(scope="module")
def bert(tokenizer):
    return load("bert-nano", tokenizer=tokenizer)[0]


def test_capture_attention_gives_causal_probabilities_and_restores_the_fast_path(gpt, tokenizer):
    ids = encode_for_model(gpt, tokenizer, TEXT)
    inputs = model_inputs(gpt, ids)
    probs = capture_attention(gpt, inputs)
    length = len(ids)
    assert len(probs) == gpt.config.n_layers
    assert probs[0].shape == (1, gpt.config.n_heads, length, length)
    assert torch.allclose(probs[1].sum(-1), torch.ones(1, gpt.config.n_heads, length), atol=1e-5)
    assert probs[1][..., torch.ones(length, length, dtype=torch.bool).triu(1)].abs().max() == 0
    assert all(not module.capture_attention and module.last_attention_probs is None
               for module in attention_modules(gpt))


def test_bert_attention_looks_both_ways(bert, tokenizer):
    probs = capture_attention(bert, model_inputs(bert, encode_for_model(bert, tokenizer, TEXT)))[0][0]
    assert probs.triu(1).sum() > 0.1


def test_summarize_heads_names_the_patterns():
    length = 6
    previous = torch.zeros(length, length)
    previous[0, 0] = 1
    previous[torch.arange(1, length), torch.arange(length - 1)] = 1
    first = torch.zeros(length, length)
    first[:, 0] = 1
    itself = torch.eye(length)
    summaries = summarize_heads(torch.stack([previous, first, itself]))
    assert [summary.pattern for summary in summaries] == ["previous token", "first token (sink)", "self"]
    assert summaries[0].previous_token == 1.0 and summaries[0].entropy == pytest.approx(0.0, abs=1e-6)
    assert HeadSummary(0, 0.3, 0.3, 0.4, 2.0).pattern == "mixed"
    uniform = torch.full((1, 4, 4), 0.25)
    assert summarize_heads(uniform)[0].entropy == pytest.approx(2.0)


def test_draw_attention_grid_writes_a_png_atomically(tmp_path, gpt, tokenizer):
    ids = encode_for_model(gpt, tokenizer, TEXT)
    probs = capture_attention(gpt, model_inputs(gpt, ids))[0][0]
    out = draw_attention_grid(probs, [token_label(tokenizer, i) for i in ids], tmp_path / "attn.png", "layer 0")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["attn.png"]
    # Long texts drop the tick labels but still draw every head.
    long = torch.rand(3, 50, 50).softmax(-1)
    draw_attention_grid(long, ["x"] * 50, tmp_path / "long.png", "long")
    assert (tmp_path / "long.png").stat().st_size > 1000


def test_pick_layer():
    assert pick_layer(4, -1) == 3 and pick_layer(4, 2) == 2
    with pytest.raises(UserError, match="--layer 4 is out of range; this model has layers 0..3"):
        pick_layer(4, 4)


def test_inspect_io_for_a_gpt(gpt, tokenizer):
    report = inspect_io(gpt, tokenizer, TEXT, top_k=3)
    ids = tokenizer.encode(TEXT)
    assert report.input_ids == ids and report.attention_mask == [1] * len(ids)
    assert report.token_type_ids is None
    assert report.clm_labels == ids[1:] + [IGNORE_INDEX]
    with torch.no_grad():
        logits = gpt(torch.tensor([ids]))[0]
    assert report.loss == pytest.approx(float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))), rel=1e-5)
    for t, top in enumerate(report.predictions):
        assert len(top) == 3 and top[0].token_id == int(logits[t].argmax())
        assert top[0].probability >= top[1].probability >= top[2].probability


def test_inspect_io_for_a_bert_builds_the_mlm_example(bert, tokenizer):
    report = inspect_io(bert, tokenizer, TEXT + " <|endoftext|>", mask_prob=0.5, seed=3)
    ids = report.input_ids
    assert report.token_type_ids == [0] * len(ids)
    chosen = [t for t, label in enumerate(report.mlm_labels) if label != IGNORE_INDEX]
    assert chosen, "mask_prob=0.5 should choose some tokens"
    assert all(report.mlm_labels[t] == ids[t] for t in chosen)
    assert all(report.mlm_input_ids[t] == ids[t] for t in range(len(ids)) if t not in chosen)
    assert report.mlm_labels[-1] == IGNORE_INDEX, "special tokens are never chosen"
    assert tokenizer.mask_id in report.mlm_input_ids
    with torch.no_grad():
        logits = bert(torch.tensor([report.mlm_input_ids]))[0]
    expected = F.cross_entropy(logits, torch.tensor(report.mlm_labels), ignore_index=IGNORE_INDEX)
    assert report.loss == pytest.approx(float(expected), rel=1e-5)


def test_render_io_shows_every_tensor(bert, tokenizer):
    console = Console(record=True, width=220)
    render_io(inspect_io(bert, tokenizer, "the cat <|mask|> on the mat", mask_prob=0.5), console, tokenizer)
    text = console.export_text()
    for expected in ("input_ids", "attention_mask", "token_type_ids", "CLM label", "MLM label", "<|mask|>",
                     "masked LM loss"):
        assert expected in text


def test_labs_input_errors(gpt, tokenizer):
    with pytest.raises(UserError, match="has no tokenizer"):
        require_tokenizer(None, "nano")
    with pytest.raises(UserError, match="the model's context is 128"):
        encode_for_model(gpt, tokenizer, "cat " * 200)
    with pytest.raises(UserError, match="encodes to no tokens"):
        encode_for_model(gpt, tokenizer, "")


def test_token_labels_are_printable():
    class Fake:
        def decode(self, ids):
            return {1: " a\n", 2: "\x00"}[ids[0]]

    assert token_label(Fake(), 1) == "·a\\n"
    assert token_label(Fake(), 2) == "\\x00"


def test_draw_attention_grid_into_an_unwritable_place_is_a_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot write to output directory"):
        draw_attention_grid(torch.rand(2, 3, 3).softmax(-1), ["a", "b", "c"], blocker / "attn.png", "t")
