"""Progress of long commands on stderr: a rich bar on a terminal, plain periodic lines otherwise.

stdout stays for the command's result (a table, JSON), so progress never mixes into a pipe or a
file. A log or CI (stderr not a terminal) gets one line per phase start, then one at most every
``every_s`` seconds, then one at the phase's end: enough to see that a long run moves and how fast.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class PhaseProgress:
    """Called as ``progress(phase, done, total[, unit])``: shows each phase's ``done`` of ``total``.

    A new phase name ends the one before. Use as a context manager; leaving it ends the last phase.
    """

    def __init__(self, command: str, unit: str = "steps", *, stream: TextIO | None = None,
                 every_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._command = command
        self._unit = unit
        self._stream = stream if stream is not None else sys.stderr
        self._every_s = every_s
        self._clock = clock
        self._bar: Progress | None = None
        if self._stream.isatty():
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(file=self._stream), transient=True)
        self._phase: str | None = None
        self._task: TaskID | None = None
        self._started = 0.0
        self._last_line = 0.0
        self._done = 0
        self._total = 0
        self._phase_unit = unit

    def __enter__(self) -> PhaseProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self._end_phase()
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, phase: str, done: int, total: int, unit: str | None = None) -> None:
        if phase != self._phase:
            self._end_phase()
            self._phase, self._started, self._done, self._total = phase, self._clock(), done, total
            self._phase_unit = unit or self._unit
            self._last_line = self._started
            if self._bar is not None:
                self._task = self._bar.add_task(f"{self._command}: {phase}", total=total, completed=done,
                                                unit=self._phase_unit)
            else:
                self._line(f"{phase} started ({total:,} {self._phase_unit})")
            return
        self._done, self._total = done, total
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, total=total)
            return
        now = self._clock()
        if now - self._last_line >= self._every_s:
            self._last_line = now
            self._line(self._status(now))

    def _end_phase(self) -> None:
        if self._phase is None:
            return
        if self._bar is None:
            self._line(self._status(self._clock(), ended=True))
        self._phase = None

    def _status(self, now: float, ended: bool = False) -> str:
        elapsed_s = now - self._started
        rate = f", {self._done / elapsed_s:,.0f} {self._phase_unit}/s" if elapsed_s > 0 else ""
        percent = f" ({self._done / self._total:.0%})" if self._total else ""
        return (f"{self._phase} {'done: ' if ended else ''}{self._done:,}/{self._total:,} {self._phase_unit}{percent}"
                f"{rate}, {elapsed_s:.0f} s")

    def _line(self, text: str) -> None:
        self._stream.write(f"{self._command}: {text}\n")
        self._stream.flush()


__all__ = ["PhaseProgress"]
