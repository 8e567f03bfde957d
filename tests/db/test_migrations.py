"""festina_hpc.db.migrate: the shipped migrations go up to head and down to base on SQLite and
PostgreSQL, step by step, and build exactly the schema the models declare."""

from __future__ import annotations

import configparser
import fnmatch
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from festina_hpc.db import migrate
from festina_hpc.db.models import Base

REPO = Path(__file__).resolve().parents[2]


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_to_head_and_downgrade_to_base(engine: Engine) -> None:
    assert migrate.current(engine).current is None
    assert _tables(engine) == set()
    revision = migrate.upgrade(engine)
    assert revision.is_head and revision.current == migrate.head_revision()
    assert _tables(engine) == set(Base.metadata.tables)
    revision = migrate.downgrade(engine, "base")
    assert revision.current is None
    assert _tables(engine) == set()
    assert migrate.upgrade(engine).is_head  # and back up again: the downgrade left nothing behind


def test_every_revision_steps_up_and_down_one_at_a_time(engine: Engine) -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    for revision in revisions:
        assert migrate.upgrade(engine, revision).current == revision
    for previous in [*reversed(revisions[:-1]), None]:
        assert migrate.downgrade(engine, "-1").current == previous


def test_models_and_migrations_agree(engine: Engine) -> None:
    migrate.upgrade(engine)
    assert migrate.schema_diff(engine) == []


def test_upgrade_at_head_changes_nothing(engine: Engine) -> None:
    migrate.upgrade(engine)
    assert migrate.upgrade(engine).is_head
    assert _tables(engine) == set(Base.metadata.tables)


def test_time_range_queries_have_indexes(engine: Engine) -> None:
    migrate.upgrade(engine)
    inspector = inspect(engine)
    for table, column in [("requests", "arrival_at"), ("energy_samples", "sampled_at"),
                          ("decisions", "decided_at"), ("slurm_jobs", "start_at"), ("slurm_jobs", "end_at"),
                          ("model_instances", "phase")]:
        assert [column] in [ix["column_names"] for ix in inspector.get_indexes(table)], (table, column)


def test_migration_scripts_are_shipped_as_package_data() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in setup["options.package_data"]["festina_hpc"].splitlines() if p.strip()]
    package = REPO / "festina_hpc"
    shipped = [p.relative_to(package).as_posix() for p in migrate.MIGRATIONS_DIR.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert any(name.endswith("0001_initial.py") for name in shipped)
    for name in shipped:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_keys_issued_before_roles_become_user_keys(engine: Engine) -> None:
    """0005: a key of an older database is a user key after the upgrade, so nobody gains /admin/* by it."""
    migrate.upgrade(engine, "0004")
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO api_keys (key_hash, prefix, user_name, account, models, created_at) "
            "VALUES ('h1', 'fk_aaaaaaaa', 'alice', 'proj1', '', CURRENT_TIMESTAMP)"))
    migrate.upgrade(engine, "0005")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT role FROM api_keys")).scalar_one() == "user"
    migrate.downgrade(engine, "0004")
    assert "role" not in {c["name"] for c in inspect(engine).get_columns("api_keys")}


def test_decisions_recorded_before_repeat_counts_were_each_decided_once(engine: Engine) -> None:
    """0009: an older row counts one decision, last made at its decided_at."""
    migrate.upgrade(engine, "0008")
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO decisions (decided_at, kind, action, reason, details) "
            "VALUES ('2026-03-01 12:00:00+00:00', 'power', 'power_off', 'empty', '{}')"))
    migrate.upgrade(engine, "0009")
    with engine.connect() as connection:
        times, first, last = connection.execute(text(
            "SELECT times_decided, decided_at, last_decided_at FROM decisions")).one()
    assert times == 1 and first == last
    migrate.downgrade(engine, "0008")
    assert "times_decided" not in {c["name"] for c in inspect(engine).get_columns("decisions")}
