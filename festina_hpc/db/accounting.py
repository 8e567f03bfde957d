"""The accounting queries: the shipped ``queries/*.sql`` files, loaded, checked and run on either backend.

Each file holds one statement with named parameters (``:since``, ``:until``, ``:limit``) and a
header comment that documents them; operators run the same files by hand (``db/queries`` in the
repository is this folder). ``run_query`` binds the parameters with festina's column types, so a
time range compares instants on SQLite (UTC text) and PostgreSQL (``timestamptz``) alike, and
gives back times as aware UTC datetimes whichever backend answered. ``REPORTS`` maps each
``festina energy report --by`` choice to its query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Integer, bindparam, text
from sqlalchemy.exc import DBAPIError

from festina_hpc.db.engine import first_line, mask_url, unavailable
from festina_hpc.db.errors import DatabaseError
from festina_hpc.db.types import UtcDateTime
from festina_hpc.errors import FestinaError

QUERIES_DIR = Path(__file__).resolve().parent / "queries"

# `festina energy report --by X` runs REPORTS[X]. user, account and tenant charge alike (by the gateway
# requests' tokens, the Slurm job's owner in hours without any), so on a live cluster, where festinad's
# own job serves everyone, they name who sent the requests; energy_by_account_day (the Slurm job's
# account per day) stays a shipped query.
REPORTS = {
    "job": "top_jobs_by_energy",
    "model": "energy_per_token_per_model",
    "user": "energy_by_user",
    "account": "energy_by_account",
    "tenant": "energy_by_tenant",
    "node": "idle_energy_per_node",
    "day": "energy_by_day",
}

# Everything a range defaults to: all of time festina can store.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)

_PARAM_DOC = re.compile(r"^--\s+:(\w+)\s+(.+)$")
_PARAM_USE = re.compile(r"(?<![:\w]):(\w+)")
_PARAM_TYPES: dict[str, Any] = {"since": UtcDateTime(), "until": UtcDateTime(), "limit": Integer()}


class QueryError(FestinaError):
    """An unknown query or a parameter it does not take (or lacks)."""


@dataclass(frozen=True)
class Query:
    name: str
    title: str  # the header's first line, after "name: "
    parameters: dict[str, str]  # name -> its documentation, in header order
    sql: str  # the statement, header comment removed


@dataclass(frozen=True)
class QueryResult:
    name: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def query_names() -> list[str]:
    return sorted(path.stem for path in QUERIES_DIR.glob("*.sql"))


def parse_query(name: str, source: str) -> Query:
    """A query file: its header (title, documented parameters) and statement; checks they agree."""
    lines = source.splitlines()
    header = [line for line in lines if line.startswith("--")]
    body = "\n".join(line for line in lines if not line.startswith("--")).strip()
    if not header or not header[0].startswith(f"-- {name}: "):
        raise QueryError(f"query {name}: the first line must be '-- {name}: <what it answers>'")
    parameters = {m.group(1): m.group(2).strip() for line in header if (m := _PARAM_DOC.match(line))}
    used = set(_PARAM_USE.findall(body))
    if used != set(parameters):
        raise QueryError(f"query {name}: parameters used {sorted(used)} but documented {sorted(parameters)}")
    if ";" in body.rstrip(";"):
        raise QueryError(f"query {name}: holds more than one statement")
    return Query(name, header[0].removeprefix(f"-- {name}: "), parameters, body.rstrip(";"))


def load_query(name: str) -> Query:
    path = QUERIES_DIR / f"{name}.sql"
    if not re.fullmatch(r"\w+", name) or not path.is_file():
        raise QueryError(f"query {name!r} is not one of {', '.join(query_names())}")
    return parse_query(name, path.read_text(encoding="utf-8"))


def run_query(engine: Engine, name: str, *, since: datetime = EARLIEST, until: datetime = LATEST,
              limit: int | None = None) -> QueryResult:
    """Run a shipped query over [since, until); ``limit`` only for queries that take one."""
    query = load_query(name)
    given: dict[str, Any] = {"since": since, "until": until}
    if limit is not None:
        given["limit"] = limit
    missing = set(query.parameters) - set(given)
    if missing:
        raise QueryError(f"query {name} needs {', '.join(sorted(missing))}")
    values = {key: value for key, value in given.items() if key in query.parameters}
    stmt = text(query.sql).bindparams(*(bindparam(key, type_=_PARAM_TYPES[key]) for key in values))
    try:
        with engine.connect() as connection:
            result = connection.execute(stmt, values)
            columns = tuple(result.keys())
            rows = [tuple(_value(column, value) for column, value in zip(columns, row)) for row in result]
    except DBAPIError as exc:
        if exc.connection_invalidated or "connect" in str(exc.orig).lower():
            raise unavailable(engine.url, exc) from None
        raise DatabaseError(f"database {mask_url(engine.url)}: query {name} failed: {first_line(exc)}") from None
    return QueryResult(name, columns, rows)


def _value(column: str, value: Any) -> Any:
    """Times as aware UTC datetimes: SQLite hands back the UTC text festina stored."""
    if column.endswith("_at") and isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return value


__all__ = ["EARLIEST", "LATEST", "QUERIES_DIR", "REPORTS", "Query", "QueryError", "QueryResult", "load_query",
           "parse_query", "query_names", "run_query"]
