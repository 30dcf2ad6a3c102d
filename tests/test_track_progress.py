"""TrainProgress: status text, ETA by steps and by budget, plain-line mode vs live bar."""
from __future__ import annotations

import io

import pytest

from lmforge.track.progress import TrainProgress, format_count, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_formatting_helpers():
    assert format_duration(5) == "0:05"
    assert format_duration(3723) == "1:02:03"
    assert format_count(950) == "950"
    assert format_count(45_230) == "45.2k"
    assert format_count(4_560_000) == "4.56M"


def test_eta_from_step_rate_counts_only_this_session():
    clock = FakeClock()
    # Resumed at step 100 of 1000: 10 steps in 10 s -> 890 steps left take 890 s.
    progress = TrainProgress(total_steps=1000, start_step=100, stream=io.StringIO(), live=False, clock=clock)
    assert progress.eta_s() is None
    clock.now += 10
    progress.update(110, {"loss": 3.21049, "tokens_per_s": 45_230})
    assert progress.eta_s() == pytest.approx(890)
    status = progress.status()
    assert status.startswith("step 110/1000  11%")
    assert "loss 3.2105" in status and "45.2k tok/s" in status and "eta 14:50" in status


def test_budget_sets_eta_and_the_sooner_limit_wins():
    clock = FakeClock()
    progress = TrainProgress(budget_s=60, stream=io.StringIO(), live=False, clock=clock)
    clock.now += 15
    progress.update(30)
    assert progress.eta_s() == pytest.approx(45)
    assert progress.fraction() == pytest.approx(0.25)
    assert "0:15/1:00 budget" in progress.status() and "eta 0:45" in progress.status()
    # With 1000 steps at 2 steps/s the step limit is ~8 min away; the budget (45 s) ends the run first.
    both = TrainProgress(total_steps=1000, budget_s=60, stream=io.StringIO(), live=False, clock=clock)
    clock.now += 15
    both.update(30)
    assert both.eta_s() == pytest.approx(45)
    clock.now += 100  # past the budget: never a negative ETA
    assert both.eta_s() == 0 and both.fraction() == 1.0


def test_plain_mode_prints_a_line_every_n_steps_and_the_last():
    stream, clock = io.StringIO(), FakeClock()
    progress = TrainProgress(total_steps=12, every=5, stream=stream, live=False, clock=clock)
    for step in range(1, 13):
        clock.now += 1
        progress.update(step, {"loss": 5.0 - step / 10})
        if step == 6:
            progress.print("eval: val_loss 4.2")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("|")[0].split()[1] for line in lines if line.startswith("step")] == \
        ["1/12", "6/12", "11/12", "12/12"]
    assert "eval: val_loss 4.2" in lines
    assert "\r" not in stream.getvalue() and "\x1b[" not in stream.getvalue()  # no redraw codes in logs


def test_live_mode_draws_a_bar_and_keeps_messages():
    stream = io.StringIO()
    progress = TrainProgress(total_steps=4, stream=stream, live=True)
    for step in range(1, 5):
        progress.update(step, {"loss": 2.0, "tokens_per_s": 1000})
    progress.print("eval: val_loss 1.9")
    progress.close()
    text = stream.getvalue()
    assert "━" in text and "step 4/4 100%" in text and "eval: val_loss 1.9" in text


def test_disabled_progress_prints_nothing():
    stream = io.StringIO()
    progress = TrainProgress(total_steps=3, stream=stream, live=True, enabled=False)
    progress.update(1, {"loss": 1.0})
    progress.print("hello")
    progress.close()
    assert stream.getvalue() == ""
