"""``festina db``: create, migrate and inspect festina's database (Alembic, no alembic.ini needed).

Every command takes ``--db-url``; without it the URL is ``$FESTINA_DB_URL``, else the
config's ``[db] url``, else a SQLite file in the user's state folder. ``db_url_option``
and ``open_engine`` are shared with any other command that opens the database.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click
from sqlalchemy import Engine

from festina_hpc.cli.common import AppContext, echo_json, json_option, pass_app
from festina_hpc.db import migrate
from festina_hpc.db.engine import check_connection, make_engine, resolve_db_url
from festina_hpc.db.retention import prune_samples, retention_cutoff
from festina_hpc.db.store import Store, utc_now

F = TypeVar("F", bound=Callable[..., Any])


def db_url_option(func: F) -> F:
    return click.option("--db-url", default=None, metavar="URL",
                        help="Database URL (default: $FESTINA_DB_URL, else the config's [db] url, "
                             "else a SQLite file in ~/.local/state/festina).")(func)


def open_engine(app: AppContext, db_url: str | None) -> tuple[Engine, str]:
    """An engine for the resolved URL, checked to answer; and the URL with its password masked."""
    resolved = resolve_db_url(db_url, os.environ, app.config.db, config_source=app.config.source)
    engine = make_engine(resolved.url)
    check_connection(engine)
    return engine, resolved.masked()


def _report(masked_url: str, revision: migrate.Revision, as_json: bool, verb: str) -> None:
    if as_json:
        echo_json({"db_url": masked_url, "revision": revision.current, "head": revision.head,
                   "is_head": revision.is_head})
        return
    current = revision.current or "base (no festina tables)"
    suffix = " (head)" if revision.is_head else f" (head is {revision.head})"
    click.echo(f"{masked_url}: {verb} {current}{suffix if revision.current else ''}")


@click.group("db")
def db_group() -> None:
    """festina's database: migrations, status and raw-sample retention."""


@db_group.command("upgrade")
@db_url_option
@click.option("--revision", default="head", show_default=True, help="Alembic revision to migrate up to.")
@json_option
@pass_app
def upgrade(app: AppContext, db_url: str | None, revision: str, as_json: bool) -> None:
    """Create festina's tables, or migrate them up to REVISION."""
    engine, masked = open_engine(app, db_url)
    try:
        _report(masked, migrate.upgrade(engine, revision), as_json, "at")
    finally:
        engine.dispose()


@db_group.command("downgrade")
@click.argument("revision")
@db_url_option
@json_option
@pass_app
def downgrade(app: AppContext, revision: str, db_url: str | None, as_json: bool) -> None:
    """Migrate down to REVISION ("base" drops every festina table, and its data)."""
    engine, masked = open_engine(app, db_url)
    try:
        _report(masked, migrate.downgrade(engine, revision), as_json, "at")
    finally:
        engine.dispose()


@db_group.command("current")
@db_url_option
@json_option
@pass_app
def current(app: AppContext, db_url: str | None, as_json: bool) -> None:
    """Show the database's URL (password masked) and its revision."""
    engine, masked = open_engine(app, db_url)
    try:
        _report(masked, migrate.current(engine), as_json, "at")
    finally:
        engine.dispose()


@db_group.command("prune")
@click.option("--older-than-days", type=click.IntRange(min=1), default=None, metavar="DAYS",
              help="Delete raw energy samples older than DAYS (default: the config's db.sample_retention_days).")
@db_url_option
@json_option
@pass_app
def prune(app: AppContext, older_than_days: int | None, db_url: str | None, as_json: bool) -> None:
    """Delete old raw energy samples; the rollups that reports read are kept."""
    days = older_than_days if older_than_days is not None else app.config.db.sample_retention_days
    cutoff = retention_cutoff(utc_now(), days)
    engine, masked = open_engine(app, db_url)
    try:
        Store(engine).check_schema()
        if cutoff is None:
            result = None
        else:
            result = prune_samples(engine, cutoff)
    finally:
        engine.dispose()
    if as_json:
        echo_json({"db_url": masked, "retention_days": days, "before": result.before.isoformat() if result else None,
                   "samples": result.samples if result else 0, "shares": result.shares if result else 0})
    elif result is None:
        click.echo(f"{masked}: retention is off (db.sample_retention_days = 0): nothing pruned")
    else:
        click.echo(f"{masked}: pruned {result.samples:,} samples ({result.shares:,} shares) taken before "
                   f"{result.before.isoformat(timespec='seconds')}; rollups kept")
