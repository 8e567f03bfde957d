"""``festina energy``: GPU energy reports (by job, model, user, account, node, day), any shipped query, plots.

Thin over ``festina_hpc.db.accounting`` (the SQL in ``db/queries``) and ``festina_hpc.accounting``
(formats, plots). Every command opens the database the ``festina db`` commands do (``--db-url``,
``$FESTINA_DB_URL``, the config) and refuses one that does not answer or is not migrated.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click
from rich.console import Console

from festina_hpc.accounting.report import FORMATS, as_csv, as_json, as_table, range_title
from festina_hpc.cli.common import AppContext, echo_json, pass_app
from festina_hpc.cli.db import db_url_option, open_engine
from festina_hpc.cli.params import TIME
from festina_hpc.db.accounting import EARLIEST, LATEST, REPORTS, QueryResult, query_names, run_query
from festina_hpc.db.store import Store

since_option = click.option("--since", type=TIME, default=None,
                            help="Start, inclusive: an ISO 8601 date or date-time (UTC without an offset) or a "
                                 "duration back from now (1h, 30m, 2d) [the beginning].")
until_option = click.option("--until", type=TIME, default=None, help="End, exclusive (same forms as --since) [now].")
format_option = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                             help="A table, CSV, or one JSON object.")


def _range(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    start = since if since is not None else EARLIEST
    end = until if until is not None else LATEST
    if start >= end:
        raise click.BadParameter(f"{start.isoformat()} is not before --until ({end.isoformat()})",
                                 param_hint="'--since'")
    return start, end


def _run(app: AppContext, db_url: str | None, name: str, since: datetime, until: datetime,
         limit: int | None) -> QueryResult:
    engine, _masked = open_engine(app, db_url)
    try:
        Store(engine).check_schema()
        return run_query(engine, name, since=since, until=until, limit=limit)
    finally:
        engine.dispose()


def _print(result: QueryResult, fmt: str, by: str | None, since: datetime, until: datetime, title: str) -> None:
    if fmt == "json":
        echo_json(as_json(result, by=by, since=since, until=until))
    elif fmt == "csv":
        click.echo(as_csv(result), nl=False)
    else:
        Console().print(as_table(result, f"{title}, {range_title(since, until)}"))


@click.group("energy")
def energy() -> None:
    """GPU energy accounting: reports, queries and plots from the rollups."""


@energy.command("report")
@click.option("--by", "by", type=click.Choice(sorted(REPORTS)), required=True,
              help="job: top jobs; model: energy per token; user, account, tenant (account and user): each "
                   "instance-hour's energy split by the tokens of the gateway requests it served, an hour "
                   "without requests to its Slurm job's owner; node: idle energy; day. The Slurm job's "
                   "account per day: festina energy query energy_by_account_day.")
@since_option
@until_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Jobs at most (--by job).")
@format_option
@db_url_option
@pass_app
def report(app: AppContext, by: str, since: datetime | None, until: datetime | None, limit: int, fmt: str,
           db_url: str | None) -> None:
    """GPU energy by job, model, user, account, node or day over [--since, --until)."""
    start, end = _range(since, until)
    result = _run(app, db_url, REPORTS[by], start, end, limit)
    _print(result, fmt, by, start, end, f"GPU energy by {by}")


@energy.command("query")
@click.argument("name", type=click.Choice(query_names()))
@since_option
@until_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Rows at most, for queries that take :limit.")
@format_option
@db_url_option
@pass_app
def query(app: AppContext, name: str, since: datetime | None, until: datetime | None, limit: int, fmt: str,
          db_url: str | None) -> None:
    """Run one of the shipped accounting queries (db/queries/NAME.sql) over [--since, --until)."""
    start, end = _range(since, until)
    result = _run(app, db_url, name, start, end, limit)
    _print(result, fmt, None, start, end, name)


@energy.command("plot")
@click.option("--what", type=click.Choice(["model", "node"]), required=True,
              help="model: GPU energy per hour by model; node: mean GPU power per hour by node.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, metavar="FILE.png")
@since_option
@until_option
@db_url_option
@pass_app
def plot_cmd(app: AppContext, what: str, out: Path, since: datetime | None, until: datetime | None,
             db_url: str | None) -> None:
    """Plot energy over time by model, or power per node, into a PNG file."""
    from festina_hpc.accounting.plot import PLOTS, plot

    start, end = _range(since, until)
    result = _run(app, db_url, PLOTS[what][0], start, end, None)
    lines = plot(result, what, out, range_title(start, end))
    click.echo(f"{out}: {lines} {'models' if what == 'model' else 'nodes'}, {len(result.rows)} hourly points")
