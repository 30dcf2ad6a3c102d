"""Prompt-lookup decoding (infer/prompt_lookup.py): the draft search, and an engine with it gives
exactly the tokens of plain greedy decoding in fewer forwards, beside sampled rows and stop strings."""
from __future__ import annotations

import pytest

from infer_support import load_tiny
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.prompt_lookup import accepted_length, lookup_draft

pytestmark = pytest.mark.usefixtures("one_thread")
# Repetitive prompts: a tiny Shakespeare model continues them by repeating, so drafts are found.
PROMPTS = ["ROMEO: O Romeo, Romeo, wherefore art thou Romeo? ROMEO: O Romeo, Romeo,",
           "the king the king the king the king the",
           "What say you, my lord? I pray you tell me",
           "To be or not to be, to be or not to be, to be or",
           "O"]


def test_lookup_draft_takes_what_followed_the_latest_earlier_occurrence():
    assert lookup_draft([1, 2, 3, 4, 5, 1, 2]) == [3, 4, 5, 1]           # "1 2" occurred: what came after
    assert lookup_draft([1, 2, 3, 9, 2, 3, 7, 2, 3]) == [7, 2, 3]         # the latest occurrence wins
    assert lookup_draft([5, 6, 7, 8]) == []                               # nothing repeats
    assert lookup_draft([1, 2, 3, 1, 2], max_draft=2) == [3, 1]
    assert lookup_draft([4, 4]) == [4]
    assert lookup_draft([1, 2, 1], max_draft=0) == [] and lookup_draft([3]) == []
    # The longest matching n-gram (up to max_ngram) decides: "8 1 2" beats the later "1 2".
    assert lookup_draft([8, 1, 2, 5, 1, 2, 6, 8, 1, 2], max_ngram=3) == [5, 1, 2, 6]
    assert lookup_draft([8, 1, 2, 5, 1, 2, 6, 8, 1, 2], max_ngram=2) == [6, 8, 1, 2]


def test_accepted_length_counts_the_agreeing_prefix():
    assert accepted_length([5, 6, 7], [5, 6, 9, 1]) == 2
    assert accepted_length([5, 6, 7], [4, 6, 7, 1]) == 0
    assert accepted_length([5, 6], [5, 6, 8]) == 2
    assert accepted_length([], [3]) == 0


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_tokens_are_unchanged_and_fewer_forwards_run(tiny, rows):
    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=40, stop_token_ids=[])
    plain = Engine(model, tokenizer, max_batch_size=rows)
    lookup = Engine(model, tokenizer, max_batch_size=rows, prompt_lookup=4)
    expected = plain.generate(PROMPTS, params)
    got = lookup.generate(PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in expected]
    assert lookup.stats.accepted_draft_tokens > 0
    assert lookup.stats.generated_tokens == plain.stats.generated_tokens
    assert lookup.stats.steps < plain.stats.steps


def test_sampled_rows_stop_strings_and_limits_beside_drafting_rows(tiny):
    model, tokenizer = tiny
    greedy = SamplingParams(max_new_tokens=17, stop=["Romeo?"], stop_token_ids=[])
    sampled = SamplingParams(max_new_tokens=20, temperature=0.9, seed=7, stop_token_ids=[])
    penalised = SamplingParams(max_new_tokens=12, repetition_penalty=1.3)
    requests = [(PROMPTS[0], greedy), (PROMPTS[1], sampled), (PROMPTS[3], penalised), (PROMPTS[1], greedy)]

    def run(engine):
        sequences = [engine.submit(p, params) for p, params in requests]
        while not all(s.finished for s in sequences):
            engine.step()
        return [(s.token_ids, s.result().text, s.finish_reason) for s in sequences]

    plain = Engine(model, tokenizer, max_batch_size=4)
    lookup = Engine(model, tokenizer, max_batch_size=4, prompt_lookup=3)
    assert run(lookup) == run(plain)
    assert all(len(tokens) <= params.max_new_tokens for (tokens, _, _), (_, params) in zip(run(lookup), requests))
    assert lookup.stats.draft_tokens > 0
