"""festina_hpc.db.engine: where the URL comes from, how SQLite is set up, and one-line errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from festina_hpc.config import DbConfig
from festina_hpc.db import migrate
from festina_hpc.db.engine import (
    DB_URL_ENV,
    check_connection,
    make_engine,
    mask_url,
    parse_db_url,
    resolve_db_url,
)
from festina_hpc.db.errors import DatabaseError, DatabaseUnavailable
from festina_hpc.db.store import Store


@pytest.mark.parametrize(("case", "option", "env", "config_url", "expected_url", "expected_source"), [
    ("option wins", "sqlite:////opt/a.db", {DB_URL_ENV: "sqlite:////env.db"}, "sqlite:////cfg.db",
     "sqlite:////opt/a.db", "--db-url"),
    ("then the environment", None, {DB_URL_ENV: "sqlite:////env.db"}, "sqlite:////cfg.db",
     "sqlite:////env.db", DB_URL_ENV),
    ("an empty variable is unset", None, {DB_URL_ENV: ""}, "sqlite:////cfg.db", "sqlite:////cfg.db",
     "festina.toml db.url"),
    ("then the config", None, {}, "sqlite:////cfg.db", "sqlite:////cfg.db", "festina.toml db.url"),
    ("then the default", None, {}, "", "sqlite:////state/festina/festina.db", "default"),
])
def test_url_resolution_order(monkeypatch: pytest.MonkeyPatch, case: str, option: str | None, env: dict[str, str],
                              config_url: str, expected_url: str, expected_source: str) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/state")
    resolved = resolve_db_url(option, env, DbConfig(url=config_url), config_source="festina.toml")
    assert (resolved.url.render_as_string(), resolved.source) == (expected_url, expected_source), case


def test_default_database_is_in_the_users_state_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert DbConfig().resolved_url() == f"sqlite:///{tmp_path}/.local/state/festina/festina.db"


@pytest.mark.parametrize(("raw", "driver"), [
    ("postgresql://u@h/db", "postgresql+psycopg"),
    ("postgres://u@h/db", "postgresql+psycopg"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
    ("sqlite:///x.db", "sqlite"),
])
def test_postgresql_urls_mean_psycopg_3(raw: str, driver: str) -> None:
    assert parse_db_url(raw).drivername == driver


@pytest.mark.parametrize(("case", "raw", "expected"), [
    ("not a URL", "festina.db", "'festina.db' is not a database URL"),
    ("bad port, password masked", "postgresql://u:hunter2@h:port/db", "postgresql://u:***@h:port/db"),
    ("unsupported backend", "mysql://u@h/db", "'mysql://u@h/db' is not supported"),
])
def test_bad_url_is_one_line_error(case: str, raw: str, expected: str) -> None:
    with pytest.raises(DatabaseError) as info:
        resolve_db_url(raw, {}, DbConfig())
    message = str(info.value)
    assert "\n" not in message and message.startswith("--db-url: "), case
    assert expected in message and "hunter2" not in message, (case, message)


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("postgresql+psycopg://festina:s3cret@db.example:5432/festina") == \
        "postgresql+psycopg://festina:***@db.example:5432/festina"
    assert mask_url("sqlite:////var/lib/festina/festina.db") == "sqlite:////var/lib/festina/festina.db"


def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new' / 'festina.db'}")  # the folder is created
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_database_that_does_not_answer_is_one_line_error_naming_the_url() -> None:
    port = _closed_port()
    engine = make_engine(f"postgresql://festina:hunter2@127.0.0.1:{port}/festina")
    with pytest.raises(DatabaseUnavailable) as info:
        check_connection(engine)
    message = str(info.value)
    assert message.startswith(f"database postgresql+psycopg://festina:***@127.0.0.1:{port}/festina does not answer: ")
    assert "\n" not in message and "hunter2" not in message


def test_unopenable_sqlite_file_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DatabaseUnavailable, match=r"^database sqlite:///.*/file/x\.db does not answer: cannot create"):
        make_engine(f"sqlite:///{tmp_path / 'file' / 'x.db'}")


def test_store_on_a_database_not_migrated_says_to_upgrade(engine: Engine) -> None:
    head = migrate.head_revision()
    with pytest.raises(DatabaseError, match=rf"is at revision None, festina needs {head}: run `festina db upgrade`"):
        Store(engine).check_schema()


def test_store_on_a_migrated_database_passes_the_schema_check(migrated: Engine) -> None:
    Store(migrated).check_schema()
