"""Sampling filters and penalties, checked against Hugging Face's logits processors."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from lmforge.errors import UserError
from lmforge.infer.sampling import BatchSampler, SamplingParams, filter_logits

V = 50


def kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


def run_filter(logits: torch.Tensor, **settings) -> torch.Tensor:
    params = SamplingParams(temperature=1.0, **settings)
    n = logits.shape[0]
    return filter_logits(logits, torch.full((n,), params.top_k), torch.full((n,), params.top_p),
                         torch.full((n,), params.min_p), [params] * n)


def test_top_k_top_p_min_p_keep_the_same_tokens_as_transformers():
    logits = torch.randn(4, V) * 3
    no_ids = torch.zeros(4, 1, dtype=torch.long)
    for top_k in (1, 5, 20):
        assert torch.equal(kept(run_filter(logits, top_k=top_k)), kept(TopKLogitsWarper(top_k)(no_ids, logits)))
    for top_p in (0.05, 0.5, 0.9, 0.999):
        assert torch.equal(kept(run_filter(logits, top_p=top_p)), kept(TopPLogitsWarper(top_p)(no_ids, logits)))
    for min_p in (0.01, 0.1, 0.5):
        assert torch.equal(kept(run_filter(logits, min_p=min_p)), kept(MinPLogitsWarper(min_p)(no_ids, logits)))
    # Combined, in HF's order: top-k first, then top-p on what is left.
    theirs = TopPLogitsWarper(0.8)(no_ids, TopKLogitsWarper(10)(no_ids, logits))
    assert torch.equal(kept(run_filter(logits, top_k=10, top_p=0.8)), kept(theirs))
    # Off means off: every token survives.
    assert kept(run_filter(logits, top_p=1.0, top_k=0, min_p=0.0)).all()


def sampler_with(rows: list[SamplingParams], prompt_ids: list[int]) -> BatchSampler:
    sampler = BatchSampler(len(rows), V)
    for row, params in enumerate(rows):
        sampler.assign(row, params, prompt_ids, seed=row)
    return sampler


def test_repetition_penalty_matches_transformers_and_penalties_use_generated_counts():
    logits = torch.randn(1, V) * 2
    prompt, generated = [3, 7, 7], [11, 3, 11, 11]
    params = SamplingParams(repetition_penalty=1.5)
    sampler = sampler_with([params], prompt)
    rows = torch.tensor([0])
    for token in generated:
        sampler.observe(rows, torch.tensor([token]), [0])
    theirs = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + generated]), logits.clone())
    assert torch.allclose(sampler._penalise(logits, rows), theirs)

    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    sampler = sampler_with([params], prompt)
    for token in generated:
        sampler.observe(rows, torch.tensor([token]), [0])
    expected = logits.clone()
    expected[0, 11] -= 0.5 * 3 + 0.25          # generated three times
    expected[0, 3] -= 0.5 * 1 + 0.25           # once (its prompt occurrences do not count)
    assert torch.allclose(sampler._penalise(logits, rows), expected)


def test_each_row_follows_its_own_settings_and_greedy_rows_are_untouched():
    logits = torch.randn(3, V) * 2
    rows_params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=5, seed=1),
                   SamplingParams(repetition_penalty=2.0)]
    sampler = sampler_with(rows_params, [int(logits[2].argmax())])
    tokens, _, _ = sampler.sample(logits, torch.arange(3), [0, 1, 2])
    assert tokens[0] == logits[0].argmax()                        # greedy, bit for bit
    assert tokens[1] in logits[1].topk(5).indices                 # sampled inside its top-5
    assert tokens[2] != logits[2].argmax()                        # its best token was seen: penalised
    alone = sampler_with([rows_params[0]], [])
    assert alone.sample(logits[:1], torch.tensor([0]), [0])[0][0] == tokens[0]


def test_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    temperature, draws = 0.8, 4000
    params = SamplingParams(temperature=temperature)
    sampler = BatchSampler(draws, len(logits))
    for row in range(draws):
        sampler.assign(row, params, [], seed=row)
    tokens, _, _ = sampler.sample(logits.expand(draws, -1), torch.arange(draws), list(range(draws)))
    frequencies = torch.bincount(tokens, minlength=len(logits)).float() / draws
    assert torch.allclose(frequencies, (logits / temperature).softmax(-1), atol=0.03)


def test_filtered_tokens_are_never_drawn_even_at_the_ends_of_the_vocabulary():
    """Inverse-CDF draws: a token of probability 0 (first, middle or last) never starts a CDF step."""
    logits = torch.tensor([0.0, 3.0, 2.5, 1.0, 0.0])
    draws = 2000
    sampler = BatchSampler(draws, len(logits))
    for row in range(draws):
        sampler.assign(row, SamplingParams(temperature=1.0, top_k=3), [], seed=row)
    tokens, _, _ = sampler.sample(logits.expand(draws, -1), torch.arange(draws), list(range(draws)))
    counts = torch.bincount(tokens, minlength=len(logits))
    assert counts[[0, 4]].sum() == 0 and (counts[1:4] > 0).all()
    kept = logits[1:4].softmax(-1)
    assert torch.allclose(counts[1:4].float() / draws, kept, atol=0.04)


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(2, V)
    sampler = sampler_with([SamplingParams(logprobs=True, repetition_penalty=3.0),
                            SamplingParams(logprobs=True, temperature=2.0, seed=0)], [int(logits[0].argmax())])
    tokens, logprobs, top = sampler.sample(logits, torch.arange(2), [0, 1])
    expected = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    assert torch.allclose(logprobs, expected)
    assert top is None


def test_top_logprobs_are_the_k_most_likely_tokens_of_the_raw_distribution():
    logits = torch.randn(2, V)
    sampler = sampler_with([SamplingParams(top_logprobs=3, repetition_penalty=3.0),
                            SamplingParams(top_logprobs=1, temperature=2.0, seed=0)], [int(logits[0].argmax())])
    _, logprobs, (values, ids) = sampler.sample(logits, torch.arange(2), [0, 1])
    assert logprobs is not None   # top_logprobs implies the chosen tokens' log-probs
    expected = logits.log_softmax(-1).topk(3, dim=-1)
    assert values.shape == (2, 3)   # k = the largest request; each row keeps its own k later
    assert torch.equal(ids, expected.indices) and torch.allclose(values, expected.values)
    with pytest.raises(UserError, match="top_logprobs must be an integer from 0 to 20"):
        SamplingParams(top_logprobs=21).validate()


@pytest.mark.parametrize("settings, message", [
    (dict(top_k=2**63), "top_k must be an integer from 0 (off) to 2147483647"),
    (dict(top_k=-1), "top_k must be an integer"),
    (dict(top_k=5.0), "top_k must be an integer"),
    (dict(temperature=float("inf")), "temperature must be a finite number in [0, 100]"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=1e39), "temperature must be in [0, 100]"),
    (dict(temperature=10**400), "temperature must be a finite number"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(temperature=True), "temperature must be a number"),
    (dict(repetition_penalty=1e39), "repetition_penalty must be in [0.01, 100]"),
    (dict(repetition_penalty=1e-39), "repetition_penalty must be in [0.01, 100]"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    (dict(frequency_penalty=1e39), "frequency_penalty must be in [-100, 100]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be a finite number"),
    (dict(presence_penalty=-1e39), "presence_penalty must be in [-100, 100]"),
    (dict(presence_penalty=float("-inf")), "presence_penalty must be a finite number"),
    (dict(top_p=float("nan")), "top_p must be a finite number in (0, 1]"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(min_p=float("inf")), "min_p must be a finite number in [0, 1]"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be a positive integer"),
    (dict(seed=2**64), "seed must be an integer between"),
    (dict(seed=1.5), "seed must be an integer between"),
    (dict(stop=[3]), "stop must be a list of non-empty strings"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be token ids"),
    (dict(ignore_eos="yes"), "ignore_eos must be true or false"),
    (dict(top_logprobs=-1), "top_logprobs must be an integer from 0 to 20"),
])
def test_every_sampling_value_is_checked_at_the_boundary(settings, message):
    """Values that are not finite, out of range or of the wrong type are one clear UserError, never a
    failure later inside the shared decode step (a float32 row tensor cannot hold 1e39, an int64 one 2**63)."""
    with pytest.raises(UserError) as caught:
        SamplingParams(**settings).validate()
    assert message in str(caught.value)
    assert str(caught.value).endswith("; fix the sampling settings")


def test_values_are_normalised_and_top_k_is_clamped_to_the_vocabulary():
    params = SamplingParams(temperature=1, repetition_penalty=2, top_k=10**6, top_p=1).validate()
    assert isinstance(params.temperature, float) and isinstance(params.repetition_penalty, float)
    assert SamplingParams(temperature=1e-7).validate().greedy     # below MIN_TEMPERATURE: greedy, not logits / 1e-7
    logits = torch.randn(2, V)
    sampler = BatchSampler(2, V)
    for row, settings in enumerate([dict(top_k=10**6), dict(top_k=0)]):
        sampler.assign(row, SamplingParams(temperature=1.0, **settings).validate(), [], seed=0)
    assert sampler.top_k.tolist() == [V, 0]                        # k >= V keeps every token, as off does
    both, _, _ = sampler.sample(logits[[0, 0]], torch.arange(2), [0, 1])
    assert both[0] == both[1]                                      # same seed, same draw: clamped k = off


def test_generator_states_put_seeded_draws_back():
    params = SamplingParams(temperature=1.0, seed=5).validate()
    sampler = sampler_with([params, SamplingParams(temperature=1.0).validate(), SamplingParams()], [])
    saved = sampler.generator_states([0, 1, 2])
    assert list(saved) == [0]                                      # only seeded, sampled rows promise anything
    logits = torch.randn(1, V)
    first = sampler.sample(logits, torch.tensor([0]), [0])[0]
    sampler.restore_generators(saved)
    assert torch.equal(sampler.sample(logits, torch.tensor([0]), [0])[0], first)
