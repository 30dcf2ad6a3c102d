"""The one process pool lmforge uses (tokenizer training counts pieces in it, `data prepare`
tokenizes in it): tasks in order, results in the same order, a bounded number in flight.

Start method: always "spawn", on every platform. Forking copies a process that may hold other
threads mid-operation (torch's intra-op pool, OpenMP, the Rust `tokenizers` pool, a serving
thread): a lock held by one of them stays locked forever in the child, which then hangs. Python
3.12 warns about fork with threads for that reason and 3.14 stops defaulting to it on Linux.
Spawn starts clean interpreters: each worker pays for its imports once (a fraction of a second),
which is why callers use a pool only for inputs big enough to amortise it. Spawn also needs the
worker function and its arguments to be picklable, module-level objects.
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Any, Callable, Iterable, Iterator, TypeVar

TaskT = TypeVar("TaskT")
ResultT = TypeVar("ResultT")

START_METHOD = "spawn"


def ordered_map(function: Callable[[TaskT], ResultT], tasks: Iterable[TaskT], num_workers: int,
                initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = (),
                in_flight_per_worker: int = 2) -> Iterator[tuple[TaskT, ResultT]]:
    """Yield (task, function(task)) in task order, computed by `num_workers` spawned processes.

    At most `in_flight_per_worker * num_workers` tasks are submitted and not yet yielded, so the
    task iterator (reading a corpus, say) never runs far ahead and memory stays bounded. An
    exception in a worker (a UserError included) is raised here, at its task. Closing the
    generator early (or an error while consuming it) terminates the pool at once.
    """
    context = multiprocessing.get_context(START_METHOD)
    limit = max(1, in_flight_per_worker * num_workers)
    with context.Pool(num_workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append((task, pool.apply_async(function, (task,))))
            if len(pending) >= limit:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
