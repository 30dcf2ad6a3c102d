"""Fair scheduling: rows are shared between requests (groups), so one big request cannot hold them all."""
from __future__ import annotations

import pytest

from infer_support import load_tiny
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.requests import Sequence
from lmforge.infer.scheduling import FairQueue
from lmforge.infer.text import TextStream

pytestmark = pytest.mark.usefixtures("one_thread")


class _NoText:
    def decode(self, ids: list[int]) -> str:
        return ""


def sequence(id: int, group: int, prompt_length: int = 1) -> Sequence:
    return Sequence(id=id, prompt_ids=[1] * prompt_length, params=SamplingParams(), stop_ids=frozenset(),
                    text=TextStream(_NoText(), [], []), seed=0, group=group)


def test_the_queue_serves_the_group_with_fewest_rows_then_round_robin():
    queue = FairQueue()
    for i in range(4):
        queue.append(sequence(i, group="big"))
    queue.append(sequence(10, group="small"))
    queue.append(sequence(20, group="other"))
    # Nothing runs yet: round-robin in arrival order, each group goes to the back once served.
    assert [s.id for s in queue.take(4, {}, max_prefill_tokens=10**6)] == [0, 10, 20, 1]
    assert len(queue) == 2 and [s.id for s in queue] == [2, 3]
    # A newcomer beats the group that already holds rows, whatever waits ahead of it.
    queue.append(sequence(30, group="late"))
    assert queue.pop({"big": 2}).id == 30
    assert queue.pop({"big": 2}).id == 2


def test_the_queue_keeps_the_prefill_budget_and_drops_cancelled_sequences():
    queue = FairQueue()
    for i in range(3):
        queue.append(sequence(i, group=i, prompt_length=40))
    assert [s.id for s in queue.take(3, {}, max_prefill_tokens=100)] == [0, 1]   # 3 x 40 > 100
    queue.append(sequence(5, group=2))
    cancelled = [s for s in queue if s.id == 2]
    cancelled[0].cancelled = True
    assert queue.remove_if(lambda s: s.cancelled) == cancelled
    assert [s.id for s in queue] == [5] and len(queue) == 1


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


def test_a_short_request_is_admitted_while_a_big_one_is_still_queued(tiny):
    """Two rows; one request of 12 long prompts takes both; a 2-token request sent next gets the
    first row that frees up, not a row after all 12 (FIFO would make it wait ~6 x 8 steps)."""
    engine = Engine(*tiny, max_batch_size=2)
    long = SamplingParams(max_new_tokens=8, ignore_eos=True)
    group = engine.new_group()
    big = [engine.submit("ROMEO:", long, group=group) for _ in range(12)]
    engine.step()
    assert engine.running == 2
    short = engine.submit("The king", SamplingParams(max_new_tokens=2, ignore_eos=True))
    steps = 0
    while not short.finished:
        engine.step()
        steps += 1
        assert steps <= 8 + 2, "the short request should get the first freed row"
    assert sum(s.finished for s in big) <= 2, "the big request is mostly still to run"
    while engine.has_work:
        engine.step()
    assert all(s.finish_reason == "length" for s in big)


def test_sequences_of_two_big_requests_interleave(tiny):
    engine = Engine(*tiny, max_batch_size=2)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    first, second = engine.new_group(), engine.new_group()
    a = [engine.submit("ROMEO:", params, group=first) for _ in range(4)]
    b = [engine.submit("O", params, group=second) for _ in range(4)]
    engine.step()
    # One row each, although all of `a` was queued first.
    assert sum(s.row is not None for s in a) == 1 and sum(s.row is not None for s in b) == 1
    while engine.has_work:
        engine.step()
    assert all(s.finish_reason == "length" for s in a + b)
