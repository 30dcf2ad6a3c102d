"""One sequence's failure inside the engine fails that sequence alone; the rest of the batch finishes.

Each test injects a failure (monkeypatch) for one sequence while others run next to it, and
checks that the others give exactly what they give alone, and the failed one's consumer hears of it.
"""
from __future__ import annotations

import pytest

from infer_support import load_tiny
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.engine import GenerationError

PROMPTS = ["ROMEO:", "To be or not to be, that is", "The king", "O"]
# Seeded and sampled: the others' tokens only match "alone" if their draws are not disturbed.
PARAMS = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, seed=3, ignore_eos=True)
POISON_SEED = 666


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture
def engine(tiny):
    model, tokenizer = tiny
    return Engine(model, tokenizer, max_batch_size=4)


@pytest.fixture(scope="module")
def alone(tiny):
    engine = Engine(*tiny, max_batch_size=1)
    return [engine.generate([prompt], PARAMS)[0].token_ids for prompt in PROMPTS]


def run_with_poison(engine: Engine, poisoned_index: int = 1) -> list:
    """Submit PROMPTS together (the poisoned one with POISON_SEED), step until all finish."""
    sequences = [engine.submit(p, SamplingParams(**{**PARAMS.__dict__, "seed": POISON_SEED})
                               if i == poisoned_index else PARAMS) for i, p in enumerate(PROMPTS)]
    for _ in range(200):
        if all(s.finished for s in sequences):
            break
        engine.step()
    return sequences


def check_others(sequences: list, alone: list, poisoned_index: int = 1) -> None:
    for index, sequence in enumerate(sequences):
        if index == poisoned_index:
            assert sequence.finish_reason == "error" and isinstance(sequence.error, RuntimeError)
            with pytest.raises(GenerationError, match="injected"):
                sequence.raise_if_failed()
        else:
            assert sequence.finish_reason == "length"
            assert sequence.token_ids == alone[index]


def poisoned_rows(engine: Engine, row_list: list[int]) -> list[int]:
    return [row for row in row_list
            if engine.slots[row] is not None and engine.slots[row].params.seed == POISON_SEED]


def test_a_row_the_batched_sampler_fails_on_fails_alone(engine, alone, monkeypatch):
    """The failure comes after the real draws, so the retried rows must get their generators back."""
    sample = engine.sampler.sample

    def failing(logits, rows, row_list):
        result = sample(logits, rows, row_list)
        for row in poisoned_rows(engine, row_list):
            if len(engine.slots[row].token_ids) >= 3:
                raise RuntimeError("injected sampling failure")
        return result

    monkeypatch.setattr(engine.sampler, "sample", failing)
    sequences = run_with_poison(engine)
    check_others(sequences, alone)
    assert len(sequences[1].token_ids) == 3
    assert engine.stats.failed == 1 and not engine.has_work
    # The engine keeps working, and the freed row is reused.
    assert engine.generate([PROMPTS[0]], PARAMS)[0].token_ids == alone[0]


def test_a_failure_while_accepting_a_token_fails_that_sequence_alone(engine, alone, monkeypatch):
    submit = engine.submit

    def submit_and_break_the_text_stream(prompt, params=None, **kwargs):
        sequence = submit(prompt, params, **kwargs)
        if params.seed == POISON_SEED:
            push = sequence.text.push
            calls = []

            def failing_push(token):
                calls.append(token)
                if len(calls) == 5:
                    raise RuntimeError("injected decode failure")
                return push(token)
            sequence.text.push = failing_push
        return sequence

    monkeypatch.setattr(engine, "submit", submit_and_break_the_text_stream)
    check_others(run_with_poison(engine), alone)


def test_a_failure_assigning_a_row_fails_that_sequence_alone(engine, alone, monkeypatch):
    assign = engine.sampler.assign

    def failing(row, params, prompt_ids, seed):
        if params.seed == POISON_SEED:
            raise RuntimeError("injected: value cannot be converted without overflow")
        assign(row, params, prompt_ids, seed)

    monkeypatch.setattr(engine.sampler, "assign", failing)
    sequences = run_with_poison(engine)
    check_others(sequences, alone)
    assert sequences[1].token_ids == [] and engine.running == 0


def test_a_prompt_whose_prefill_fails_fails_alone(engine, alone, tiny, monkeypatch):
    """All four prompts are prefilled in one forward; it fails, each is retried alone, one fails again."""
    _, tokenizer = tiny
    poisoned_ids = tokenizer.encode(PROMPTS[1])
    forward = engine._forward

    def failing(ids, mask, rows, last):
        if mask is not None and any(row[:len(poisoned_ids)].tolist() == poisoned_ids and int(m.sum()) == len(
                poisoned_ids) for row, m in zip(ids, mask)):
            raise RuntimeError("injected prefill failure")
        return forward(ids, mask, rows, last)

    monkeypatch.setattr(engine, "_forward", failing)
    check_others(run_with_poison(engine), alone)


def test_stream_and_generate_raise_for_a_failed_sequence(engine, monkeypatch):
    sample = engine.sampler.sample

    def failing(logits, rows, row_list):
        if any(engine.slots[row].token_ids for row in row_list):
            raise RuntimeError("injected")
        return sample(logits, rows, row_list)

    monkeypatch.setattr(engine.sampler, "sample", failing)
    pieces = []
    with pytest.raises(GenerationError, match="injected") as caught:
        for piece in engine.stream("ROMEO:", PARAMS):   # the text before the failure still arrives
            pieces.append(piece)
    assert isinstance(caught.value.__cause__, RuntimeError) and len(pieces) <= 1   # one token, then the failure
    with pytest.raises(GenerationError):
        engine.generate(["The king", "O"], PARAMS)
    assert not engine.has_work


def test_an_update_callback_that_raises_cancels_only_its_sequence(engine, alone):
    def broken(sequence):
        raise RuntimeError("injected callback failure")

    bad = engine.submit(PROMPTS[1], PARAMS, on_update=broken)
    good = [engine.submit(PROMPTS[i], PARAMS) for i in (0, 2)]
    while not all(s.finished for s in good):
        engine.step()
    engine.step()
    assert bad.finish_reason == "cancelled" and bad.cancelled
    assert [s.token_ids for s in good] == [alone[0], alone[2]]


def test_generate_cancels_what_it_queued_when_a_later_prompt_is_refused(engine):
    with pytest.raises(Exception, match="outside the vocabulary"):
        engine.generate(["ROMEO:", [10**9]], PARAMS)
    engine.step()
    assert not engine.has_work
