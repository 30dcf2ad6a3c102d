"""The generation engine: KV-cache decoding, batching, stopping, streaming, seeds, log-probs."""
from __future__ import annotations

import threading

import pytest
import torch

from infer_support import load_tiny
from lmforge.errors import UserError
from lmforge.infer import Engine, SamplingParams

PROMPTS = ["ROMEO:", "To be or not to be, that is", "The king", "What say you, my lord? I pray you tell me", "O"]
# Greedy, with penalties so that different prompts give visibly different continuations.
VARIED = SamplingParams(max_new_tokens=24, repetition_penalty=1.3, frequency_penalty=0.3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture
def engine(tiny):
    model, tokenizer = tiny
    return Engine(model, tokenizer, max_batch_size=4)


def naive_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Reference: recompute the whole sequence every step, no KV cache, no batching."""
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out]))[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_greedy_decoding_with_the_kv_cache_equals_full_recomputation(tiny, engine):
    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[])
    for prompt in PROMPTS[:3]:
        ids = tokenizer.encode(prompt)
        [result] = engine.generate([ids], params)
        expected = naive_greedy(model, ids, 12)
        # Stop at the first end token, as the engine does.
        cut = next((i for i, t in enumerate(expected) if t in engine.end_token_ids), len(expected))
        assert result.token_ids == expected[:cut]


def test_batched_prompts_of_different_lengths_equal_each_served_alone(engine):
    # 5 prompts, 4 cache rows: the fifth waits for a free row and joins mid-flight.
    alone = [engine.generate([prompt], VARIED)[0] for prompt in PROMPTS]
    together = engine.generate(PROMPTS, VARIED)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert len({r.text for r in together}) >= 3, "prompts should give different continuations"
    assert engine.running == 0 and not engine.waiting


def test_seeded_sampling_is_reproducible_alone_and_batched(engine):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    alone = engine.generate(["To be"], params)[0]
    batched = engine.generate(["The king", "To be", "O"], params)[1]
    assert alone.token_ids == batched.token_ids
    other_seed = engine.generate(["To be"], SamplingParams(max_new_tokens=20, temperature=1.0, seed=8))[0]
    assert other_seed.token_ids != alone.token_ids


def test_max_new_tokens_and_usage_counts(engine, tiny):
    _, tokenizer = tiny
    [result] = engine.generate(["ROMEO:"], SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    assert result.finish_reason == "length"
    assert result.completion_tokens == len(result.token_ids) == 5
    assert result.prompt_tokens == len(tokenizer.encode("ROMEO:"))
    assert result.text == tokenizer.decode(result.token_ids)


def test_stop_token_ends_generation_without_appearing(engine):
    free = engine.generate(["ROMEO:"], VARIED)[0]
    stop_token = free.token_ids[5]
    first = free.token_ids.index(stop_token)
    result = engine.generate(["ROMEO:"], SamplingParams(**{**VARIED.__dict__, "stop_token_ids": [stop_token]}))[0]
    assert result.finish_reason == "stop"
    assert result.token_ids == free.token_ids[:first]
    assert result.completion_tokens == first + 1   # the stop token was generated, then dropped


def test_stop_string_cuts_the_text_even_across_tokens(engine):
    free = engine.generate(["To be or not to be, that is"], VARIED)[0]
    stop = free.text[6:9]
    assert len(stop) == 3
    result = engine.generate(["To be or not to be, that is"], SamplingParams(**{**VARIED.__dict__, "stop": [stop]}))[0]
    assert result.finish_reason == "stop"
    assert result.text == free.text[:free.text.index(stop)]
    streamed = "".join(engine.stream("To be or not to be, that is", SamplingParams(**{**VARIED.__dict__, "stop": [stop]})))
    assert streamed == result.text


def test_stream_pieces_join_to_the_generated_text(engine):
    params = SamplingParams(max_new_tokens=30, temperature=0.9, seed=3)
    pieces = list(engine.stream("What say you", params))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.generate(["What say you"], params)[0].text


def test_logprobs_are_the_model_log_softmax_of_each_chosen_token(tiny, engine):
    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=1, logprobs=True)
    [result] = engine.generate(["The king"], params)
    ids = tokenizer.encode("The king") + result.token_ids
    with torch.inference_mode():
        reference = model(torch.tensor([ids]))[0].log_softmax(-1)
    start = len(ids) - len(result.token_ids)
    expected = [float(reference[start - 1 + i, token]) for i, token in enumerate(result.token_ids)]
    assert result.logprobs == pytest.approx(expected, abs=1e-4)
    assert result.top_logprobs is None

    [with_top] = engine.generate(["The king"], SamplingParams(max_new_tokens=6, temperature=1.0, seed=1,
                                                              top_logprobs=4))
    assert with_top.token_ids == result.token_ids and len(with_top.top_logprobs) == len(result.token_ids)
    for i, alternatives in enumerate(with_top.top_logprobs):
        best = reference[start - 1 + i].topk(4)
        assert [token for token, _ in alternatives] == best.indices.tolist()
        assert [logprob for _, logprob in alternatives] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_context_overflow_truncates_left_or_refuses(tiny):
    model, tokenizer = tiny
    long_prompt = list(range(100, 100 + 140))           # more than the 128-token context
    truncating = Engine(model, tokenizer, max_batch_size=1, context_policy="truncate_left")
    [result] = truncating.generate([long_prompt], SamplingParams(max_new_tokens=8))
    assert result.prompt_tokens == 128 - 8
    assert result.token_ids == truncating.generate([long_prompt[-120:]], SamplingParams(max_new_tokens=8))[0].token_ids
    refusing = Engine(model, tokenizer, max_batch_size=1, context_policy="error")
    with pytest.raises(UserError, match="140 tokens.*context of 128"):
        refusing.generate([long_prompt], SamplingParams(max_new_tokens=8))
    with pytest.raises(UserError, match="max_new_tokens=200"):
        refusing.generate(["hi"], SamplingParams(max_new_tokens=200))


def test_bad_settings_are_user_errors(engine):
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                dict(min_p=1.5), dict(repetition_penalty=0.0), dict(stop=[""])):
        with pytest.raises(UserError):
            engine.generate(["hi"], SamplingParams(**bad))
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.generate([[10_000]], SamplingParams())


def test_empty_prompt_starts_a_new_document(engine):
    [result] = engine.generate([""], SamplingParams(max_new_tokens=4, temperature=1.0, seed=0))
    assert result.prompt_tokens == 1 and len(result.token_ids) == 4


def test_closing_a_stream_early_frees_its_row(engine):
    stream = engine.stream("ROMEO:", SamplingParams(max_new_tokens=50, temperature=1.0, seed=0))
    next(stream)
    assert engine.running == 1
    stream.close()
    engine.step()
    assert engine.running == 0 and not engine.has_work


def test_threads_streaming_from_one_engine_share_batches(engine):
    """Several threads may stream at once; whoever steps advances everyone, results are unchanged."""
    expected = [engine.generate([p], VARIED)[0].text for p in PROMPTS]
    got: dict[int, str] = {}
    peak = []

    def worker(index: int) -> None:
        pieces = []
        for piece in engine.stream(PROMPTS[index], VARIED):
            pieces.append(piece)
            peak.append(engine.running)
        got[index] = "".join(pieces)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [got[i] for i in range(len(PROMPTS))] == expected
    assert max(peak) > 1, "the streams should have been decoded in shared batches"


def test_chat_streams_through_the_template(engine, tiny):
    _, tokenizer = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=2)
    reply = "".join(engine.stream_chat(messages, params))
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n"
    assert reply == engine.generate([prompt], params)[0].text
