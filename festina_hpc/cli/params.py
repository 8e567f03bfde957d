"""The command line's one grammar for time: ``TIME`` (an instant) and ``DURATION`` (a length of time).

A duration is a number of seconds or a number with a unit, largest first and combinable: ``90s``,
``15m``, ``1h30m``, ``2d``, ``1w``, ``250ms``. A time is an ISO 8601 date or date-time (UTC when it
has no offset) or a duration back from now (``--since 1h``); ``FUTURE_TIME`` counts a duration
forward instead and refuses a past instant (``--expires 90d``). Every option of the ``festina``
command that means an instant or a length of time uses these, so ``1h`` means the same everywhere,
and a bad value is click's one-line usage error naming the option and the value.

"Now" is read once per command line (kept in the click context's ``meta``), so ``--since 2h
--until 1h`` are exactly an hour apart; tests fix it by replacing ``utc_now``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import click

# Longest unit first in the alternation so "ms" is not read as minutes followed by a stray "s".
_UNIT_S = {"w": 7 * 86_400.0, "d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_PART = re.compile(rf"({_NUMBER})(ms|[wdhms])")
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|[wdhms]))+")
_SECONDS = re.compile(_NUMBER)
_NOW_KEY = "festina_hpc.cli.params.now"

DURATION_EXAMPLES = "e.g. 90s, 15m, 1h30m, 2d"


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_duration_s(text: str, *, bare_seconds: bool = True) -> float | None:
    """Seconds in ``text`` (``1h30m`` -> 5400.0; a bare number is seconds when ``bare_seconds``), or None when it
    is not a duration. Units must go from largest to smallest, each once, so ``30m1h`` or ``1m1m`` (most likely
    typos) are refused rather than guessed at."""
    text = re.sub(r"\s+", "", text).lower()  # "1h 30m" and "30 d" read as "1h30m" and "30d"
    if bare_seconds and _SECONDS.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        return None
    order = list(_UNIT_S)
    total, last = 0.0, -1
    for number, unit in _PART.findall(text):
        rank = order.index(unit)
        if rank <= last:
            return None
        total, last = total + float(number) * _UNIT_S[unit], rank
    return total


def command_now(ctx: click.Context | None) -> datetime:
    """The instant "now" of this command line: the first time or duration converted fixes it for the others."""
    if ctx is None:
        return utc_now()
    now = ctx.meta.get(_NOW_KEY)
    if now is None:
        now = ctx.meta[_NOW_KEY] = utc_now()
    return now


class TimeType(click.ParamType):
    """An instant as an aware UTC datetime: ISO 8601 (UTC without an offset) or a duration from now, counted back
    (``--since 1h``) or, with ``ahead``, forward, where the instant must then lie in the future."""

    name = "time"

    def __init__(self, *, ahead: bool = False) -> None:
        self.ahead = ahead

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "TIME"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value)
        now = command_now(ctx)
        # A bare number is not taken as seconds here: "--since 2026" is more likely a mistyped date.
        seconds = parse_duration_s(text, bare_seconds=False)
        if seconds is not None:
            instant = now + timedelta(seconds=seconds) if self.ahead else now - timedelta(seconds=seconds)
        else:
            try:
                instant = datetime.fromisoformat(text.strip())
            except ValueError:
                direction = "from now" if self.ahead else "back from now"
                example = "90d, 12h, 2w" if self.ahead else "1h, 30m, 2d"
                self.fail(f"{text!r} is not a time (ISO 8601, e.g. 2026-03-01 or 2026-03-01T12:00Z) "
                          f"or a duration {direction} (e.g. {example})", param, ctx)
            instant = instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)
        if self.ahead and instant <= now:
            self.fail(f"{text!r} is not in the future (now {now.isoformat(timespec='seconds')})", param, ctx)
        return instant


class DurationType(click.ParamType):
    """A length of time in seconds (float): a bare number of seconds or a duration (``1h30m``), at least
    ``min_s`` (excluded when ``min_open``); an int with ``whole_s``, for figures Slurm takes in whole seconds."""

    name = "duration"

    def __init__(self, *, min_s: float = 0.0, min_open: bool = False, whole_s: bool = False) -> None:
        self.min_s = min_s
        self.min_open = min_open
        self.whole_s = whole_s

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "DURATION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            seconds: float | None = float(value)
        else:
            seconds = parse_duration_s(str(value))
        if seconds is None:
            self.fail(f"{value!r} is not a duration (seconds, or {DURATION_EXAMPLES})", param, ctx)
        if seconds < self.min_s or (self.min_open and seconds == self.min_s):
            bound = "more than" if self.min_open else "at least"
            self.fail(f"{value!r} is not a duration of {bound} {self.min_s:g} s", param, ctx)
        if self.whole_s:
            if not seconds.is_integer():
                self.fail(f"{value!r} is not a whole number of seconds", param, ctx)
            return int(seconds)
        return seconds


TIME = TimeType()
FUTURE_TIME = TimeType(ahead=True)
DURATION = DurationType()
POSITIVE_DURATION = DurationType(min_open=True)


def duration(*, min_s: float = 0.0, min_open: bool = False, whole_s: bool = False) -> DurationType:
    """A ``DURATION`` with another lower bound (``--watch`` refreshes at most five times a second) or in whole
    seconds."""
    return DurationType(min_s=min_s, min_open=min_open, whole_s=whole_s)


__all__ = ["DURATION", "FUTURE_TIME", "POSITIVE_DURATION", "TIME", "DurationType", "TimeType", "command_now",
           "duration", "parse_duration_s", "utc_now"]

