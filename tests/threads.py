"""Thread control for tests: tiny models run fastest on one torch thread. Splitting microsecond ops
over two (possibly busy) cores makes threads spin and wait; a nano training step went from ~15 ms
to over a second on a shared 2-core machine."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
