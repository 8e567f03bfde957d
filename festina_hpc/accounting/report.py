"""Accounting query results as a rich table, CSV or one JSON object: the formats of ``festina energy report``."""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime
from typing import Any

from rich.table import Table

from festina_hpc.db.accounting import EARLIEST, LATEST, QueryResult

FORMATS = ("table", "csv", "json")


def _plain(value: Any) -> Any:
    """A JSON/CSV value: times as ISO 8601 UTC, NaN as null."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        if column.endswith("_kwh"):
            return f"{value:,.4f}"
        if column.endswith(("_fraction", "_attainment")) or column == "slo_attainment":
            return f"{value:.3f}"
        if column.endswith("_s"):
            return f"{value:.3f}"
        return f"{value:,.1f}"
    if isinstance(value, int) and not column.endswith("_id"):
        return f"{value:,}"
    return str(value)


def as_table(result: QueryResult, title: str) -> Table:
    table = Table(title=title)
    for column in result.columns:
        numeric = any(isinstance(row[i], int | float) and not isinstance(row[i], bool)
                      for row in result.rows for i in [result.columns.index(column)])
        table.add_column(column, justify="right" if numeric else "left")
    for row in result.rows:
        table.add_row(*(_cell(column, value) for column, value in zip(result.columns, row)))
    return table


def as_csv(result: QueryResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if (v := _plain(value)) is None else v for value in row])
    return out.getvalue()


def as_json(result: QueryResult, *, by: str | None, since: datetime, until: datetime) -> dict[str, Any]:
    return {"by": by, "query": result.name,
            "since": None if since == EARLIEST else since.isoformat(),
            "until": None if until == LATEST else until.isoformat(),
            "columns": list(result.columns),
            "rows": [{column: _plain(value) for column, value in zip(result.columns, row)} for row in result.rows]}


def range_title(since: datetime, until: datetime) -> str:
    start = "the beginning" if since == EARLIEST else since.isoformat(timespec="minutes")
    end = "now" if until == LATEST else until.isoformat(timespec="minutes")
    return f"{start} to {end}"


__all__ = ["FORMATS", "as_csv", "as_json", "as_table", "range_title"]
