"""Alembic, configured in code: no ``alembic.ini``; the scripts ship inside the package.

``upgrade``, ``downgrade`` and ``current`` take an engine and run Alembic on one of
its connections (handed to ``migrations/env.py`` through ``Config.attributes``, so a
URL with a password is never written into a config string). ``schema_diff`` lists
what differs between the models and a migrated database: empty when they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from festina_hpc.db.engine import unavailable
from festina_hpc.db.errors import DatabaseError
from festina_hpc.db.models import Base

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


@dataclass(frozen=True)
class Revision:
    current: str | None  # None: no festina tables yet
    head: str

    @property
    def is_head(self) -> bool:
        return self.current == self.head


def alembic_config() -> Config:
    """Alembic's config pointing at the shipped scripts; nothing read from files."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the package ships at least one migration"
    return head


def upgrade(engine: Engine, revision: str = "head") -> Revision:
    """Migrate the database up to ``revision`` (creating festina's tables in an empty one)."""
    _run(engine, command.upgrade, revision)
    return current(engine)


def downgrade(engine: Engine, revision: str) -> Revision:
    """Migrate the database down to ``revision`` (``base`` drops every festina table)."""
    _run(engine, command.downgrade, revision)
    return current(engine)


def current(engine: Engine) -> Revision:
    """The database's revision and the package's head."""
    try:
        with engine.connect() as connection:
            revision = MigrationContext.configure(connection).get_current_revision()
    except DBAPIError as exc:
        raise unavailable(engine.url, exc) from None
    return Revision(revision, head_revision())


def schema_diff(engine: Engine) -> list[Any]:
    """Alembic's autogenerate diff between the models and the database (empty: they agree)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True,
                                                               "compare_server_default": True})
        return list(compare_metadata(context, Base.metadata))


def _run(engine: Engine, step: Any, revision: str) -> None:
    config = alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            step(config, revision)
    except CommandError as exc:
        raise DatabaseError(f"database {engine.url.render_as_string(hide_password=True)}: "
                            f"cannot migrate to {revision!r}: {exc}") from None
    except DBAPIError as exc:
        raise unavailable(engine.url, exc) from None


__all__ = ["Revision", "alembic_config", "current", "downgrade", "head_revision",
           "schema_diff", "upgrade"]
