"""Logging for festina's commands: festina's own lines at the asked level, other libraries' quiet.

``configure_logging`` sets festina's loggers (``festina_hpc.*`` and festinad's) to the level that ``-v``
asks for while the root logger, and so every library without a level of its own (the scheduler's per-run
lines, the migration tool's plugin and context lines, SQLAlchemy, urllib3, aiohttp's access log), stays at
WARNING: a shipped unit run with ``-v`` logs what festina decided, not each scheduler tick. ``-vv`` lets the
libraries' INFO through as well. ``RepeatedLines`` says a line that recurs unchanged (a policy re-deciding
the same thing every period) once, then how often it recurred when it changes or every ``summary_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

# The loggers festina's code logs to: modules log to ``__name__`` (festina_hpc.*); festinad's command logs
# to "festinad".
OWN_LOGGERS = ("festina_hpc", "festinad")
# -v raises festina's own loggers; -vv also lets other libraries' INFO through.
LIBRARY_INFO_VERBOSITY = 2


def own_level(verbosity: int, quiet_level: int = logging.WARNING) -> int:
    """festina's own level for ``verbosity`` (the count of ``-v``): ``quiet_level`` without -v, INFO with one
    (DEBUG with one where ``quiet_level`` is already INFO), DEBUG from two on."""
    if verbosity <= 0:
        return quiet_level
    if verbosity == 1 and quiet_level > logging.INFO:
        return logging.INFO
    return logging.DEBUG


def library_level(verbosity: int) -> int:
    """Other libraries' level: WARNING unless ``verbosity`` reaches ``LIBRARY_INFO_VERBOSITY``."""
    return logging.INFO if verbosity >= LIBRARY_INFO_VERBOSITY else logging.WARNING


def configure_logging(verbosity: int, *, quiet_level: int = logging.WARNING, fmt: str | None = None,
                      handlers: Iterable[logging.Handler] | None = None) -> None:
    """Configure the root logger once per process: ``handlers`` (or stderr with ``fmt``) at the libraries'
    level, festina's own loggers at theirs (see ``own_level``); a record of an own logger propagates to the
    root's handlers whatever the root's level, since only the originating logger's level filters it.

    Like ``logging.basicConfig``, a root logger that has handlers already (a test runner's) is left alone;
    festina's own levels are set either way."""
    level = library_level(verbosity)
    if handlers is not None:
        logging.basicConfig(level=level, format=fmt or logging.BASIC_FORMAT, handlers=list(handlers))
    else:
        logging.basicConfig(level=level, format=fmt or logging.BASIC_FORMAT)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own_level(verbosity, quiet_level))


@dataclass
class _Seen:
    message: str
    level: int
    repeats: int  # times said again, unchanged, since it was last logged
    logged_at_s: float


class RepeatedLines:
    """Logs a line for a subject once while it stays the same; repeats are counted, not logged.

    ``log(key, level, msg, *args)``: ``key`` names the subject (a node's power decision, a refusal's
    reason). The first line for a key is logged; the same line again is counted; a different line for the
    key first logs how often the old one repeated (if it did), then itself; and a line repeated for
    ``summary_s`` is logged again with "(repeated N times)" so a long-lived state still shows in the log.
    """

    def __init__(self, logger: logging.Logger, summary_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._summary_s = summary_s
        self._clock = clock
        self._seen: dict[Hashable, _Seen] = {}

    def log(self, key: Hashable, level: int, msg: str, *args: object) -> None:
        message = msg % args if args else msg
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and seen.message == message:
            seen.repeats += 1
            if now - seen.logged_at_s >= self._summary_s:
                self._logger.log(level, "%s (repeated %d times)", message, seen.repeats)
                seen.repeats, seen.logged_at_s = 0, now
            return
        if seen is not None and seen.repeats:
            self._logger.log(seen.level, "%s (repeated %d times)", seen.message, seen.repeats)
        self._logger.log(level, "%s", message)
        self._seen[key] = _Seen(message, level, 0, now)


__all__ = ["LIBRARY_INFO_VERBOSITY", "OWN_LOGGERS", "RepeatedLines", "configure_logging", "library_level",
           "own_level"]
