"""`TrainProgress`: a live training progress line on stderr.

It shows step/total, loss, tokens/s, elapsed time and an ETA. The ETA comes from the step rate
when the run has a step count, from the clock when it has a wall-clock budget, and is the sooner
of the two when it has both (whichever limit ends the run first).

On a terminal it is a redrawn rich progress bar. When stderr is a file or a CI log, redrawing
would print one line per refresh, so it prints a compact status line every `every` steps instead.

    progress = TrainProgress(total_steps=1000, budget_s=600)
    for step in range(1, 1001):
        ...
        progress.update(step, {"loss": loss, "tokens_per_s": tps})
    progress.close()
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, TextIO


def format_duration(seconds: float) -> str:
    """4:05 or 1:02:03."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_count(value: float) -> str:
    """950, 12.3k, 4.56M, 1.20G: short enough for a status line."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}"


class TrainProgress:
    """Progress of one training run; see the module docstring.

    Args:
        total_steps: the step the run ends at (None if only a budget ends it).
        budget_s: wall-clock budget in seconds (None if only the step count ends it).
        start_step: the step a resumed run starts from, so the rate counts only this session.
        every: in non-terminal mode, print a line every this many steps.
        stream: where to draw (default sys.stderr).
        live: force the redrawn bar (True) or plain lines (False); None = bar only on a terminal.
        enabled: False on non-main distributed ranks, which then print nothing.
        clock: seconds since some fixed point; injectable for tests.
    """

    def __init__(self, total_steps: int | None = None, budget_s: float | None = None, start_step: int = 0,
                 every: int = 10, stream: TextIO | None = None, live: bool | None = None,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.total_steps = total_steps
        self.budget_s = budget_s
        self.start_step = start_step
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.clock = clock
        self.started = clock()
        self.step = start_step
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.tokens_per_s: float | None = None
        self._last_printed_step: int | None = None
        self._bar = None
        self._task = None
        if live is None:
            live = bool(getattr(self.stream, "isatty", lambda: False)())
        if enabled and live:
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        console = Console(file=self.stream, force_terminal=True)
        self._bar = Progress(BarColumn(bar_width=20), TextColumn("{task.fields[status]}"),
                             console=console, refresh_per_second=4)
        # The bar is drawn in permille so budget-only runs (no step total) fill it too.
        self._task = self._bar.add_task("train", total=1000 if self.fraction() is not None else None,
                                        status=self.status())
        self._bar.start()

    def elapsed_s(self) -> float:
        return self.clock() - self.started

    def fraction(self) -> float | None:
        """How far the run is, 0..1, by steps or by budget (whichever is further)."""
        parts = []
        if self.total_steps:
            parts.append(self.step / self.total_steps)
        if self.budget_s:
            parts.append(self.elapsed_s() / self.budget_s)
        return min(1.0, max(parts)) if parts else None

    def eta_s(self) -> float | None:
        """Seconds left: by step rate, by budget, or the sooner of both; None if unknown yet."""
        etas = []
        steps_done = self.step - self.start_step
        elapsed = self.elapsed_s()
        if self.total_steps is not None and steps_done > 0 and elapsed > 0:
            etas.append((self.total_steps - self.step) * elapsed / steps_done)
        if self.budget_s is not None:
            etas.append(self.budget_s - elapsed)
        return max(0.0, min(etas)) if etas else None

    def status(self) -> str:
        """One compact line, e.g. `step 120/1000 12% | loss 3.2104 | 45.2k tok/s | 1:02 | eta 8:40`."""
        step = f"step {self.step}/{self.total_steps}" if self.total_steps else f"step {self.step}"
        fraction = self.fraction()
        parts = [step + (f" {fraction:4.0%}" if fraction is not None else "")]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.val_loss is not None:
            parts.append(f"val {self.val_loss:.4f}")
        if self.tokens_per_s is not None:
            parts.append(f"{format_count(self.tokens_per_s)} tok/s")
        elapsed = format_duration(self.elapsed_s())
        parts.append(f"{elapsed}/{format_duration(self.budget_s)} budget" if self.budget_s else elapsed)
        eta = self.eta_s()
        parts.append(f"eta {format_duration(eta)}" if eta is not None else "eta ?")
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record that `step` is done; reads `loss`, `val_loss`, `tokens_per_s` from metrics if present."""
        if not self.enabled:
            return
        self.step = step
        metrics = metrics or {}
        for key, attribute in (("loss", "loss"), ("val_loss", "val_loss"), ("tokens_per_s", "tokens_per_s")):
            if metrics.get(key) is not None:
                setattr(self, attribute, float(metrics[key]))
        if self._bar is not None:
            fraction = self.fraction()
            self._bar.update(self._task, completed=None if fraction is None else fraction * 1000,
                             status=self.status())
            return
        is_last = self.total_steps is not None and step >= self.total_steps
        due = self._last_printed_step is None or step - self._last_printed_step >= self.every
        if due or is_last:
            self._print_status()

    def _print_status(self) -> None:
        self.stream.write(self.status() + "\n")
        self.stream.flush()
        self._last_printed_step = self.step

    def print(self, text: str) -> None:
        """Print a message (e.g. eval results) without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Draw the final state; safe to call twice."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, status=self.status())
            self._bar.stop()
            self._bar = None
        elif self._last_printed_step != self.step:
            self._print_status()
        self.enabled = False

    def __enter__(self) -> "TrainProgress":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
