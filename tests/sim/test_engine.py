"""The event engine: order of same-time events, handlers returning events, stopping."""

from __future__ import annotations

from festina_hpc.sim.engine import Event, EventKind, EventQueue


def test_same_time_events_pop_by_kind_then_push_order() -> None:
    q = EventQueue()
    pushed = [q.event(5.0, EventKind.ARRIVAL, "a1"), q.event(5.0, EventKind.STEP_DONE, "s1"),
              q.event(5.0, EventKind.ARRIVAL, "a2"), q.event(1.0, EventKind.SAMPLE, "early"),
              q.event(5.0, EventKind.NODE_READY, "n1"), q.event(5.0, EventKind.STEP_DONE, "s2")]
    q.push(reversed(pushed))
    seen: list[str] = []

    def handle(e: Event) -> list[Event]:
        seen.append(e.payload)
        return []

    q.run(handle)
    assert seen == ["early", "n1", "s1", "s2", "a1", "a2"]


def test_handlers_return_new_events_and_run_stops_at_until() -> None:
    q = EventQueue()
    q.push([q.event(0.0, EventKind.SAMPLE, 0)])
    times: list[float] = []

    def handle(e: Event) -> list[Event]:
        times.append(e.time_s)
        return [q.event(e.time_s + 1.0, EventKind.SAMPLE, e.payload + 1)]

    last = q.run(handle, until_s=3.5)
    assert times == [0.0, 1.0, 2.0, 3.0] and last == 3.0 and len(q) == 1 and q.handled == 4
