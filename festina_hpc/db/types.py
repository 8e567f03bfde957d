"""Column types that behave the same on SQLite and PostgreSQL: timezone-aware UTC timestamps.

PostgreSQL has ``timestamptz``; SQLite has no time type at all and SQLAlchemy stores an
ISO string without offset. ``UtcDateTime`` makes both answer the same: it accepts only
timezone-aware datetimes (a naive one is a bug: whose local time?), stores UTC, and
always returns aware UTC datetimes. Storing UTC wall time on SQLite also keeps the
strings in time order, so range queries and indexes work there too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp (``timestamptz`` on PostgreSQL, UTC text on SQLite)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise ValueError(f"{value!r} is not a timezone-aware datetime; festina stores UTC times")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # SQLite: stored as UTC wall time
        return value.astimezone(UTC)
