"""Database fixtures: every store and migration test runs on SQLite and on a real PostgreSQL.

Other engineers run tests on the same PostgreSQL at the same time, so a test session
creates its own database, ``festina_test_<random>``, through the ``test`` database and
drops it at the end; inside it each test gets a schema of its own (``search_path`` set
through the URL), so tests never see each other's tables. PostgreSQL is found at
``$FESTINA_TEST_POSTGRES_URL`` (default: user postgres on 127.0.0.1:5432, database
``test``); where none answers, the PostgreSQL cases are skipped with the reason, unless
``FESTINA_REQUIRE_POSTGRES=1`` makes that a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.engine import URL, make_url

from festina_hpc.db import migrate
from festina_hpc.db.engine import make_engine
from festina_hpc.db.store import GpuRecord, NodeRecord, RequestOutcome, Store

ADMIN_URL = os.environ.get("FESTINA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """A time ``seconds`` after T0."""
    return T0 + timedelta(seconds=seconds)


def _libpq(url: URL) -> str:
    """The conninfo of a SQLAlchemy URL, for psycopg directly (no SQLAlchemy in admin steps)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[URL]:
    """A database of this test session's own, dropped at the end."""
    admin = make_url(ADMIN_URL)
    try:
        admin_connection = psycopg.connect(_libpq(admin), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("FESTINA_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"no PostgreSQL at {admin.render_as_string()}: {str(exc).strip().splitlines()[0]}")
    name = f"festina_test_{secrets.token_hex(6)}"
    with admin_connection:
        admin_connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield admin.set(database=name, drivername="postgresql+psycopg")
        finally:
            admin_connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[URL]:
    """An empty database on ``backend``: a SQLite file, or a fresh schema in the session's PostgreSQL database."""
    if backend == "sqlite":
        yield make_url(f"sqlite:///{tmp_path / 'festina.db'}")
        return
    base: URL = request.getfixturevalue("postgres_url")
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(base), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"})
    finally:
        with psycopg.connect(_libpq(base), autocommit=True) as connection:
            connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def engine(db_url: URL) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def migrated(engine: Engine) -> Engine:
    migrate.upgrade(engine)
    return engine


class TickingClock:
    """A clock for ``updated_at`` that moves one second per reading (never the wall clock)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def store(migrated: Engine) -> Store:
    return Store(migrated, clock=TickingClock())


def make_cluster(store: Store, nodes: int = 2, gpus_per_node: int = 2) -> dict[tuple[str, int], int]:
    """Nodes n01.. with ``gpus_per_node`` H100s each; returns (node name, index) -> GPU id."""
    names = [f"n{k + 1:02d}" for k in range(nodes)]
    store.upsert_nodes([NodeRecord(name, "idle", True, gpus_per_node) for name in names])
    return store.upsert_gpus([GpuRecord(name, index, "h100-sxm-80gb", uuid=f"GPU-{name}-{index}")
                              for name in names for index in range(gpus_per_node)])


def make_outcome(**overrides: object) -> RequestOutcome:
    """A request that arrived at T0, took 0.2 s to its first token and met its SLOs."""
    fields: dict[str, object] = dict(model="llama-3.1-8b", arrival_at=T0, prompt_tokens=512, output_tokens=128,
                                     slo_met=True, first_token_at=at(0.2), finish_at=at(3.0), ttft_s=0.2,
                                     mean_tbt_s=0.02, max_tbt_s=0.05, user_name="alice", account="proj1")
    fields.update(overrides)
    return RequestOutcome(**fields)  # type: ignore[arg-type]
