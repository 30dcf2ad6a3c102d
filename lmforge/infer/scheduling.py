"""The admission policy: which waiting sequence gets the next free KV-cache row.

First come, first served lets one request monopolise the engine: a request with thousands of
prompts fills every row and the queue, and a 4-token request sent a moment later waits for all
of them. So waiting sequences are kept per *group* (one group per request: its prompts and its
`n` choices) and a free row goes to the group that holds the fewest rows now, round-robin among
equals. A big request still uses every row nobody else wants (the policy never leaves a row
idle), but a newcomer gets the next row that frees up, whatever is queued ahead of it.
"""
from __future__ import annotations

import collections
from typing import Callable, Hashable, Iterator, Mapping

from .requests import Sequence


class FairQueue:
    """Waiting sequences, grouped by `Sequence.group`, handed out fairly between the groups.

    Within a group, sequences keep their order (a request's choices start in index order).
    """

    def __init__(self) -> None:
        # Insertion order is the round-robin order: a group that is served moves to the back.
        self._groups: collections.OrderedDict[Hashable, collections.deque[Sequence]] = collections.OrderedDict()
        self._size = 0

    def append(self, sequence: Sequence) -> None:
        queue = self._groups.get(sequence.group)
        if queue is None:
            queue = self._groups[sequence.group] = collections.deque()
        queue.append(sequence)
        self._size += 1

    def next_group(self, running: Mapping[Hashable, int]) -> Hashable | None:
        """The group to serve next: fewest running sequences, then longest since it was served."""
        best, fewest = None, None
        for group in self._groups:   # in round-robin order, so the first minimum wins ties
            count = running.get(group, 0)
            if fewest is None or count < fewest:
                best, fewest = group, count
                if count == 0:
                    break
        return best

    def peek(self, running: Mapping[Hashable, int]) -> Sequence | None:
        """The sequence `pop(running)` would return, or None when nothing waits."""
        group = self.next_group(running)
        return None if group is None else self._groups[group][0]

    def pop(self, running: Mapping[Hashable, int]) -> Sequence:
        """Remove and return the next sequence to admit (see `next_group`)."""
        group = self.next_group(running)
        if group is None:
            raise IndexError("pop from an empty FairQueue")
        queue = self._groups.pop(group)
        sequence = queue.popleft()
        if queue:
            self._groups[group] = queue   # back of the round-robin order
        self._size -= 1
        return sequence

    def take(self, free_rows: int, running: Mapping[Hashable, int], max_prefill_tokens: int) -> list[Sequence]:
        """Pop the sequences to admit this step: up to `free_rows`, chosen one at a time by `pop`
        (counting those already chosen as running), while the padded prefill (sequences x longest
        prompt) stays within `max_prefill_tokens`; the first one is taken whatever its length."""
        counts = collections.Counter(running)
        chosen: list[Sequence] = []
        longest = 0
        while len(chosen) < free_rows:
            candidate = self.peek(counts)
            if candidate is None:
                break
            length = max(longest, len(candidate.prompt_ids))
            if chosen and (len(chosen) + 1) * length > max_prefill_tokens:
                break
            chosen.append(self.pop(counts))
            counts[candidate.group] += 1
            longest = length
        return chosen

    def remove_if(self, predicate: Callable[[Sequence], bool]) -> list[Sequence]:
        """Remove (and return) every waiting sequence for which `predicate` is true."""
        removed: list[Sequence] = []
        for group, queue in list(self._groups.items()):
            # One call per sequence: `cancelled` may flip in another thread meanwhile.
            verdicts = [predicate(sequence) for sequence in queue]
            if not any(verdicts):
                continue
            removed += [sequence for sequence, gone in zip(queue, verdicts) if gone]
            kept = collections.deque(sequence for sequence, gone in zip(queue, verdicts) if not gone)
            if kept:
                self._groups[group] = kept   # same place in the order: replacing a key does not move it
            else:
                del self._groups[group]
        self._size -= len(removed)
        return removed

    def clear(self) -> None:
        self._groups.clear()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Sequence]:
        for queue in list(self._groups.values()):
            yield from list(queue)
