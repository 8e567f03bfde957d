"""Checks on records before anything is written: one message shape, "<record>.<field> = <value> <what is wrong>".

Shared by the store and the energy ingest, so a bad value reads the same whichever path refused it.
Each raises ``InvalidRecord``; nothing here touches the database.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from festina_hpc.db.errors import InvalidRecord


def check_number(where: str, name: str, value: Any, *, low: float = 0.0, high: float | None = None,
            low_open: bool = False, optional: bool = False) -> None:
    if value is None:
        if optional:
            return
        raise InvalidRecord(f"{where}.{name} is missing")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRecord(f"{where}.{name} = {value!r} is not a finite number")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        if high is not None:
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        else:
            bounds = "positive" if low_open else ("non-negative" if low == 0 else f"at least {low:g}")
        raise InvalidRecord(f"{where}.{name} = {value!r} must be {bounds}")


def check_integer(where: str, name: str, value: Any, *, positive: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecord(f"{where}.{name} = {value!r} is not an integer")
    check_number(where, name, value, low_open=positive)


def check_time(where: str, name: str, value: Any, *, optional: bool = False) -> None:
    if value is None:
        if optional:
            return
        raise InvalidRecord(f"{where}.{name} is missing")
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidRecord(f"{where}.{name} = {value!r} is not a timezone-aware datetime")


def check_text(where: str, name: str, value: Any, *, max_len: int = 255, required: bool = False,
          optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise InvalidRecord(f"{where}.{name} = {value!r} is not text")
    if required and not value:
        raise InvalidRecord(f"{where}.{name} = '' must not be empty")
    if len(value) > max_len:
        raise InvalidRecord(f"{where}.{name} = {value[:40]!r}... is longer than {max_len} characters")


def check_not_before(where: str, name: str, value: datetime | None, earlier_name: str,
                earlier: datetime | None) -> None:
    if value is not None and earlier is not None and value < earlier:
        raise InvalidRecord(f"{where}.{name} = {value.isoformat()} is before {earlier_name} = {earlier.isoformat()}")
