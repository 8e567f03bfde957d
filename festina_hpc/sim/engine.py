"""The event engine: a heap of timed events, popped in a defined order, handled into new events.

Only the engine touches the heap. Events at the same time pop in the order of
their ``EventKind`` (so a step that completes at t frees its slot before a
request arriving at t is placed), then in the order they were pushed. Handlers
return the events they cause; the run is deterministic for a given input.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class EventKind(IntEnum):
    """Same-time order: lower pops first."""

    NODE_READY = 0  # a waking node is up
    INSTANCE_READY = 1  # an instance finished loading
    STEP_DONE = 2  # an instance finished a prefill or a run of decode steps
    ARRIVAL = 3  # a request arrives
    CONTROL_TICK = 4
    SCALE_TICK = 5
    CONSOLIDATE_TICK = 6
    # A node idle for SuspendTime is suspended: after the ticks at the same time, so a start they
    # plan on it keeps it up (Slurm gives a job an idle node rather than suspend it).
    NODE_SUSPEND = 7
    SAMPLE = 8  # power-over-time sample for the result


@dataclass(order=True, frozen=True)
class Event:
    time_s: float
    kind: EventKind
    seq: int = field(compare=True)
    payload: Any = field(compare=False, default=None)
    version: int = field(compare=False, default=0)  # lets a handler ignore a superseded event


Handler = Callable[[Event], Iterable[Event]]


class EventQueue:
    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = 0
        self.handled = 0

    def event(self, time_s: float, kind: EventKind, payload: Any = None, version: int = 0) -> Event:
        """A new event, numbered in creation order (the same-time, same-kind tie-break)."""
        self._seq += 1
        return Event(time_s, kind, self._seq, payload, version)

    def push(self, events: Iterable[Event]) -> None:
        for e in events:
            heapq.heappush(self._heap, e)

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, handle: Handler, until_s: float = float("inf"),
            done: Callable[[], bool] = lambda: False) -> float:
        """Pop and handle events in order until the heap is empty, the next event is past
        ``until_s``, or ``done()`` says so after an event; the time of the last event handled."""
        now_s = 0.0
        heap = self._heap
        while heap and heap[0].time_s <= until_s:
            e = heapq.heappop(heap)
            now_s = e.time_s
            self.handled += 1
            for new in handle(e):
                heapq.heappush(heap, new)
            if done():
                break
        return now_s
