"""``festina keys``: the gateway's API keys, one per user and Slurm account (thin over ``festina_hpc.db.keys``)."""

from __future__ import annotations

from datetime import datetime

import click

from festina_hpc.cli.common import AppContext, echo_json, json_option, pass_app
from festina_hpc.cli.db import db_url_option, open_engine
from festina_hpc.cli.params import FUTURE_TIME
from festina_hpc.db.keys import ROLES, KeyRing, parse_rate
from festina_hpc.db.store import Store, utc_now

_EXAMPLES = """
\b
Examples:
  festina keys create --user alice --account proj1 --models llama8b,mistral-7b --rate-limit 5/s --expires 90d
  (umask 077; festina keys create --user root --account ops --role admin > ~/.festina-admin-key)
  festina keys list --json
  festina keys revoke fk_3hQ9xZ1a
"""


def _ring(app: AppContext, db_url: str | None) -> KeyRing:
    engine, _ = open_engine(app, db_url)
    Store(engine).check_schema()
    return KeyRing(engine, app.profile_store())


@click.group("keys", epilog=_EXAMPLES)
def keys() -> None:
    """API keys of the gateway: who may send requests, for which models, how fast (festinad checks each request)."""


@keys.command("create", epilog=_EXAMPLES)
@click.option("--user", "user_name", required=True, help="User the key's requests are attributed to.")
@click.option("--account", required=True, help="Slurm account its requests' energy is charged to.")
@click.option("--models", default="", metavar="M1,M2", help="Models it may call (catalogue or profile names) "
                                                             "[every model].")
@click.option("--rate-limit", default=None, metavar="R/s", help="Requests per second (R/s, R/min or R) [no limit].")
@click.option("--expires", type=FUTURE_TIME, default=None,
              help="An ISO 8601 date or date-time (UTC without an offset) or a duration from now: 90d, 12h, 2w "
                   "[never].")
@click.option("--role", type=click.Choice(ROLES), default="user", show_default=True,
              help="user: the gateway's /v1/*; admin: also festinad's /admin/* (consolidate, nodes, drain).")
@db_url_option
@json_option
@pass_app
def create(app: AppContext, user_name: str, account: str, models: str, rate_limit: str | None, expires: datetime | None,
           role: str, db_url: str | None, as_json: bool) -> None:
    """Issue a key; its token is printed once and cannot be shown again (only its hash is stored)."""
    rate = parse_rate(rate_limit) if rate_limit is not None else None
    names = [name.strip() for name in models.split(",") if name.strip()]
    token, info = _ring(app, db_url).create(user_name, account, names, rate, expires, role)
    if as_json:
        echo_json({"token": token, **info.to_json(utc_now())})
        return
    click.echo(token)
    click.echo(f"{info.role} key {info.id} ({info.prefix}) for {info.user_name}/{info.account}: "
               f"models {', '.join(info.models) or 'all'}, "
               f"rate {f'{info.rate_limit_per_s:g}/s' if info.rate_limit_per_s else 'unlimited'}, "
               f"expires {info.expires_at.isoformat(timespec='seconds') if info.expires_at else 'never'}. "
               "Keep the token: it is not stored and cannot be shown again.", err=True)


@keys.command("list")
@click.option("--active", is_flag=True, help="Only keys neither revoked nor expired.")
@db_url_option
@json_option
@pass_app
def list_keys(app: AppContext, active: bool, db_url: str | None, as_json: bool) -> None:
    """Every issued key (prefix, never the token), newest last."""
    now = utc_now()
    shown = [k for k in _ring(app, db_url).list() if not active or k.state(now) == "active"]
    if as_json:
        echo_json({"keys": [k.to_json(now) for k in shown]})
        return
    if not shown:
        click.echo("no keys (`festina keys create --help`)")
        return
    click.echo(f"{'ID':>4} {'PREFIX':12} {'USER':12} {'ACCOUNT':12} {'ROLE':6} {'STATE':8} {'RATE/S':>7} "
               f"{'EXPIRES':20} MODELS")
    for k in shown:
        expires = k.expires_at.isoformat(timespec="minutes") if k.expires_at else "never"
        rate = f"{k.rate_limit_per_s:g}" if k.rate_limit_per_s else "-"
        click.echo(f"{k.id:4d} {k.prefix:12} {k.user_name:12} {k.account:12} {k.role:6} {k.state(now):8} {rate:>7} "
                   f"{expires:20} {','.join(k.models) or 'all'}")


@keys.command("revoke")
@click.argument("key")
@db_url_option
@pass_app
def revoke(app: AppContext, key: str, db_url: str | None) -> None:
    """Revoke KEY (its id or prefix); festinad refuses it once its key cache expires ([gateway] key_cache_ttl_s)."""
    info = _ring(app, db_url).revoke(key)
    click.echo(f"revoked key {info.id} ({info.prefix}) of {info.user_name}/{info.account}")
