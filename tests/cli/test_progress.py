"""festina_hpc.cli.progress: plain progress lines on a stream that is not a terminal."""

from __future__ import annotations

import io

import pytest

from festina_hpc.cli.progress import PhaseProgress


def test_plain_lines_say_each_phase_start_then_at_most_one_per_period_then_its_end() -> None:
    times = iter([0.0, 1.0, 6.0, 7.0, 10.0, 10.0, 11.0, 12.0])
    stream = io.StringIO()
    with PhaseProgress("festina x", "items", stream=stream, every_s=5.0, clock=lambda: next(times)) as progress:
        progress("load", 0, 1000)  # t=0: started
        progress("load", 100, 1000)  # t=1: within the period, no line
        progress("load", 600, 1000)  # t=6: a line
        progress("load", 700, 1000)  # t=7: no line
        progress("check", 0, 4, "queries")  # t=10: load ends, check starts (t=10)
        progress("check", 4, 4, "queries")  # t=11: no line; t=12: the end
    assert stream.getvalue().splitlines() == [
        "festina x: load started (1,000 items)",
        "festina x: load 600/1,000 items (60%), 100 items/s, 6 s",
        "festina x: load done: 700/1,000 items (70%), 70 items/s, 10 s",
        "festina x: check started (4 queries)",
        "festina x: check done: 4/4 queries (100%), 2 queries/s, 2 s",
    ]


def test_a_failed_command_ends_no_phase() -> None:
    stream = io.StringIO()
    with pytest.raises(RuntimeError), PhaseProgress("festina x", stream=stream) as progress:
        progress("load", 0, 10)
        raise RuntimeError("boom")
    assert stream.getvalue() == "festina x: load started (10 steps)\n"
