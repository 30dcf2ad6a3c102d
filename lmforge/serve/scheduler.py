"""Continuous batching for the HTTP server: one background thread runs the engine's decode loop.

Request handlers (asyncio, in uvicorn's event loop) `submit` prompts and read `Event`s from an
asyncio.Queue. The decode thread calls `engine.step()` while there is work; each step admits
waiting requests into free KV-cache rows, decodes one token for every running request in one
batched forward, and pushes the new text to the requests' queues. The thread never waits for a
client, so one slow reader cannot stall the others; a client that disconnects is cancelled and
its row is freed at the next step.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Hashable

from ..infer.engine import Engine, Sequence
from ..infer.sampling import SamplingParams

log = logging.getLogger("lmforge.serve")


@dataclass
class Event:
    """New text for choice `index`; `done` is set (with the finished sequence) on its last event."""

    index: int
    text: str
    tokens: int                       # tokens generated so far (for streamed log-probs)
    done: Sequence | None = None


class Scheduler:
    """Runs `engine.step()` in one background thread while requests are waiting or running."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="lmforge-decode", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, prompt: str | list[int], params: SamplingParams, events: asyncio.Queue,
               index: int = 0, group: Hashable | None = None, adapter: str | None = None) -> Sequence:
        """Queue a request; its text arrives as `Event`s on `events`. Call from the event loop.

        `group` (from `engine.new_group()`) is shared by all the sequences of one HTTP request, so
        the engine shares its rows fairly between requests; `adapter` picks one of the model's LoRA
        adapters (None: the base model). Raises UserError (bad prompt, context
        overflow) before anything is queued.
        """
        loop = asyncio.get_running_loop()

        def on_update(sequence: Sequence) -> None:
            # Runs in the decode thread: hand the new text to the event loop without blocking.
            tokens = len(sequence.token_ids)
            new = [Event(index, sequence.deltas.popleft(), tokens) for _ in range(len(sequence.deltas))]
            if sequence.finished:
                new.append(Event(index, "", tokens, done=sequence))
            try:
                for event in new:
                    loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
                self.engine.cancel(sequence)

        sequence = self.engine.submit(prompt, params, on_update=on_update, group=group, adapter=adapter)
        self.start()   # no-op when running; an app mounted inside another app gets no startup event
        self._wake.set()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        self.engine.cancel(sequence)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as error:
                # The engine fails a bad row alone; what reaches here broke the shared decode forward.
                # Keep serving: fail the requests in flight, not the server.
                log.exception("decode step failed; aborting the requests in flight")
                self.engine.abort_all("error", error)
