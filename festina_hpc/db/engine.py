"""Which database, and an engine configured for it: URL resolution, SQLite pragmas, one-line errors.

The URL comes from, in order: a command's ``--db-url`` option, ``FESTINA_DB_URL``, the
config's ``[db] url`` (whose default is a SQLite file in the user's state folder).
``resolve_db_url`` is pure (the environment is passed in) so the CLI and festinad
resolve it the same way. ``make_engine`` turns it into an engine: SQLite gets WAL (the
daemon writes while ``festina`` commands read), a busy timeout and foreign keys on, on every
connection; ``writer_engine`` makes its transactions begin IMMEDIATE, so that festinad and the
festina-node daemons sharing one SQLite file queue for the write lock instead of failing with
"database is locked" (see ``_sqlite_on_begin``). PostgreSQL goes through psycopg 3 (a bare
``postgresql://`` URL is taken to mean it).
A database that does not answer is a ``DatabaseUnavailable`` naming the URL with its
password masked.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from festina_hpc.config import DbConfig
from festina_hpc.db.errors import DatabaseError, DatabaseUnavailable

DB_URL_ENV = "FESTINA_DB_URL"
CONNECT_TIMEOUT_S = 5  # a server that does not answer in this long is reported, not waited for
SQLITE_BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for another writer's lock
# Execution option naming how an SQLite transaction begins: "DEFERRED" (the default; readers never wait) or
# "IMMEDIATE" (takes the write lock at BEGIN, waiting up to the busy timeout for it).
SQLITE_BEGIN_OPTION = "festina_sqlite_begin"
_SQLITE_BEGIN_MODES = ("DEFERRED", "IMMEDIATE")


@dataclass(frozen=True)
class ResolvedUrl:
    url: URL
    source: str  # where it came from: "--db-url", "FESTINA_DB_URL", "<config file> db.url" or "default"

    def masked(self) -> str:
        return mask_url(self.url)


def mask_url(url: URL | str) -> str:
    """The URL as text with its password (if any) replaced by ``***``."""
    if isinstance(url, str):
        try:
            return make_url(url).render_as_string(hide_password=True)
        except (ArgumentError, ValueError):
            # Not a URL make_url can read, but it may still hold "user:password@".
            return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)
    return url.render_as_string(hide_password=True)


def resolve_db_url(option: str | None, env: Mapping[str, str], config: DbConfig,
                   config_source: str = "config") -> ResolvedUrl:
    """The database URL: ``--db-url``, else ``$FESTINA_DB_URL``, else the config (or its default)."""
    if option:
        raw, source = option, "--db-url"
    elif env.get(DB_URL_ENV):
        raw, source = env[DB_URL_ENV], DB_URL_ENV
    elif config.url:
        raw, source = config.url, f"{config_source} db.url"
    else:
        raw, source = config.resolved_url(), "default"
    return ResolvedUrl(parse_db_url(raw, source), source)


def parse_db_url(raw: str, source: str = "database URL") -> URL:
    """Parse and normalise a URL: ``postgresql://`` and ``postgres://`` mean psycopg 3."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise DatabaseError(f"{source}: {mask_url(raw)!r} is not a database URL "
                            "(expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB)") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise DatabaseError(f"{source}: {mask_url(url)!r} is not supported: festina runs on sqlite or postgresql")
    return url


def make_engine(url: URL | str, *, echo: bool = False) -> Engine:
    """An engine for ``url``, configured for festina (see the module docstring).

    Creating it connects to nothing; ``check_connection`` does.
    """
    if isinstance(url, str):
        url = parse_db_url(url)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        # The daemon's threads share the engine's pool; SQLite's own locking serialises writers.
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        _make_sqlite_parent(url)
    elif url.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        engine = create_engine(url, echo=echo, connect_args=connect_args, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise DatabaseError(f"cannot use database {mask_url(url)}: {first_line(exc)}") from None
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def writer_engine(engine: Engine) -> Engine:
    """``engine`` (same pool, same events) whose SQLite transactions begin IMMEDIATE; PostgreSQL is unchanged.

    For the stores that write (``Store``, the catalogue, the key ring): their transactions read, then write.
    """
    if engine.url.get_backend_name() != "sqlite":
        return engine
    return engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})


def check_connection(engine: Engine) -> None:
    """Connect once; a database that does not answer is a one-line ``DatabaseUnavailable``."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise unavailable(engine.url, exc) from None


def unavailable(url: URL, exc: BaseException) -> DatabaseUnavailable:
    """The one-line error for a database that does not answer."""
    return DatabaseUnavailable(f"database {mask_url(url)} does not answer: {first_line(exc)}")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Python's sqlite3 begins a transaction only before a write, so a store method's reads
    # would run outside it; let SQLAlchemy say BEGIN instead (see _sqlite_on_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers (festina commands, accounting) run while the daemon writes.
        # An in-memory database answers "memory" instead; that is fine.
        cursor.execute("PRAGMA journal_mode=WAL")
        # SQLite ignores foreign keys unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    # Deferred (the default): readers never wait for the daemon's writes (WAL). But a deferred transaction
    # that reads and then writes fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT, no busy
    # timeout) when another process committed since its read: festinad and the nodes' control ticks did,
    # on the dev cluster's shared file. IMMEDIATE (``writer_engine``) takes the write lock at BEGIN, waiting
    # up to the busy timeout; writers are short, and readers in WAL still never wait for them. Chosen over
    # sending the nodes' writes through festinad: the nodes keep recording energy while festinad is down.
    mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
    if mode not in _SQLITE_BEGIN_MODES:
        raise DatabaseError(f"{SQLITE_BEGIN_OPTION} = {mode!r} is not one of {', '.join(_SQLITE_BEGIN_MODES)}")
    connection.exec_driver_sql(f"BEGIN {mode}")


def _make_sqlite_parent(url: URL) -> None:
    """Create the folder of a SQLite file (the default state folder may not exist yet)."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(f"database {mask_url(url)} does not answer: cannot create "
                                  f"{Path(database).parent}: {exc.strerror}") from None


def first_line(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement dump and background link."""
    inner = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(inner).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(inner).__name__


class Transactions:
    """Sessions over one engine, each in one transaction (committed on leaving, rolled back on an
    error); a database error becomes a one-line ``DatabaseError`` naming the database and the
    operation. The catalogue and the key ring open theirs through one."""

    def __init__(self, engine: Engine):
        self._url = engine.url
        # Catalogue and key ring transactions read, then write: IMMEDIATE on SQLite (see _sqlite_on_begin).
        self._sessions = sessionmaker(writer_engine(engine), expire_on_commit=False)

    @contextmanager
    def __call__(self, operation: str) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except DBAPIError as exc:
            raise DatabaseError(f"database {mask_url(self._url)}: {operation} failed: {first_line(exc)}") from None
