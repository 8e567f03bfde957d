"""``festina models``: the catalogue of served models (thin over ``festina_hpc.db.catalogue``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from festina_hpc.admin import client
from festina_hpc.cli.admin_options import api_key, api_key_option, festinad_url, festinad_url_option
from festina_hpc.cli.common import AppContext, echo_json, json_option, pass_app
from festina_hpc.cli.db import db_url_option, open_engine
from festina_hpc.cli.params import DURATION
from festina_hpc.db.catalogue import ENGINES, Catalogue, CatalogueEntry, CatalogueError
from festina_hpc.db.store import Store


def _catalogue(app: AppContext, db_url: str | None) -> Catalogue:
    engine, _ = open_engine(app, db_url)
    Store(engine).check_schema()
    return Catalogue(engine, app.profile_store())


def _show(entry: CatalogueEntry, instances: list[int] | None = None) -> None:
    for key, value in entry.to_json().items():
        click.echo(f"{key:14} {'' if value is None else value}")
    if instances is not None:
        click.echo(f"{'instances':14} {', '.join(map(str, instances)) or 'none running'}")


_EXAMPLES = """
\b
Examples:
  festina models add llama8b --profile llama-3.1-8b --gpu-type h100 --engine vllm \\
      --engine-args '--max-model-len 8192' --ttft-slo-s 1.0 --tbt-slo-s 0.1 --max-instances 4
  festina models list --json
  festina models update llama8b --tbt-slo-s 0.08
  festina models remove llama8b --drain
"""


@click.group("models", epilog=_EXAMPLES)
def models() -> None:
    """The catalogue of served models: profile, engine, SLOs, scaling bounds (festinad reads it at start)."""


def _scaling_options(func: Any) -> Any:
    for option in reversed([
        click.option("--engine-args", default=None, help="Extra engine arguments, shell words (e.g. vLLM flags)."),
        click.option("--min-instances", type=int, default=None, help="Instances kept even when idle [0]."),
        click.option("--max-instances", type=int, default=None, help="Most instances at once [no bound]."),
        click.option("--keep-alive-s", type=DURATION, default=None,
                     help="Idle time before scale-to-zero: seconds or 10m, 1h [festinad's daemon.keep_alive_s]."),
        click.option("--account", default=None, help="Slurm account of its serving jobs [the submitter's]."),
        click.option("--max-output-tokens", type=int, default=None,
                     help="Largest max_tokens a request may ask; more is refused with 400 [the context length]."),
    ]):
        func = option(func)
    return func


@models.command("add", epilog=_EXAMPLES)
@click.argument("name")
@click.option("--profile", required=True, help="Profile model it runs (`festina profiles list`).")
@click.option("--gpu-type", required=True, help="Profile GPU type, e.g. h100 (aliases allowed).")
@click.option("--engine", type=click.Choice(ENGINES), required=True, help="Serving engine.")
@click.option("--ttft-slo-s", type=DURATION, required=True, help="Time-to-first-token SLO: seconds or 500ms.")
@click.option("--tbt-slo-s", type=DURATION, required=True, help="Time-between-tokens SLO: seconds or 100ms.")
@_scaling_options
@db_url_option
@json_option
@pass_app
def add(app: AppContext, name: str, profile: str, gpu_type: str, engine: str, ttft_slo_s: float, tbt_slo_s: float,
        engine_args: str | None, min_instances: int | None, max_instances: int | None, keep_alive_s: float | None,
        account: str | None, max_output_tokens: int | None, db_url: str | None, as_json: bool) -> None:
    """Add NAME to the catalogue; refused with the shipped profiles when PROFILE has none on the GPU type."""
    entry = CatalogueEntry(name=name, profile=profile, gpu_type=gpu_type, engine=engine, ttft_slo_s=ttft_slo_s,
                           tbt_slo_s=tbt_slo_s, engine_args=engine_args or "", min_instances=min_instances or 0,
                           max_instances=max_instances, keep_alive_s=keep_alive_s, account=account or "",
                           max_output_tokens=max_output_tokens)
    stored = _catalogue(app, db_url).add(entry)
    if as_json:
        echo_json(stored.to_json())
    else:
        click.echo(f"added {stored.name} ({stored.profile} on {stored.gpu_type}, {stored.engine}, "
                   f"TTFT {stored.ttft_slo_s:g} s, TBT {stored.tbt_slo_s:g} s)")


@models.command("list")
@db_url_option
@json_option
@pass_app
def list_models(app: AppContext, db_url: str | None, as_json: bool) -> None:
    """Every catalogued model."""
    entries = _catalogue(app, db_url).list()
    if as_json:
        echo_json({"models": [e.to_json() for e in entries]})
        return
    if not entries:
        click.echo("no models in the catalogue (`festina models add --help`)")
        return
    click.echo(f"{'NAME':20} {'PROFILE':18} {'GPU':14} {'ENGINE':9} {'TTFT_S':>7} {'TBT_S':>6} {'MIN':>4} {'MAX':>4}")
    for e in entries:
        click.echo(f"{e.name:20} {e.profile:18} {e.gpu_type:14} {e.engine:9} {e.ttft_slo_s:7g} {e.tbt_slo_s:6g} "
                   f"{e.min_instances:4d} {'-' if e.max_instances is None else e.max_instances:>4}")


@models.command("show")
@click.argument("name")
@db_url_option
@json_option
@pass_app
def show(app: AppContext, name: str, db_url: str | None, as_json: bool) -> None:
    """One catalogued model and its running instances."""
    catalogue = _catalogue(app, db_url)
    entry = catalogue.get(name)
    running = catalogue.running_instances(name)
    if as_json:
        echo_json({**entry.to_json(), "instances": running})
    else:
        _show(entry, running)


@models.command("update", epilog=_EXAMPLES)
@click.argument("name")
@click.option("--profile", default=None, help="Profile model it runs.")
@click.option("--gpu-type", default=None, help="Profile GPU type.")
@click.option("--engine", type=click.Choice(ENGINES), default=None, help="Serving engine.")
@click.option("--ttft-slo-s", type=DURATION, default=None, help="Time-to-first-token SLO: seconds or 500ms.")
@click.option("--tbt-slo-s", type=DURATION, default=None, help="Time-between-tokens SLO: seconds or 100ms.")
@_scaling_options
@db_url_option
@json_option
@pass_app
def update(app: AppContext, name: str, db_url: str | None, as_json: bool, **changes: Any) -> None:
    """Change some fields of NAME (festinad picks the change up when it restarts)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        raise CatalogueError(f"model {name!r}: nothing to update (give at least one option)")
    entry = _catalogue(app, db_url).update(name, **changes)
    if as_json:
        echo_json(entry.to_json())
    else:
        _show(entry)


@models.command("remove")
@click.argument("name")
@click.option("--drain", is_flag=True, help="Ask festinad to stop its instances (draining them) first.")
@click.option("--timeout-s", type=DURATION, default=120.0, show_default=True,
              help="With --drain: longest wait for its instances to stop (seconds or 2m).")
@festinad_url_option
@api_key_option
@db_url_option
@pass_app
def remove(app: AppContext, name: str, drain: bool, timeout_s: float, festinad_url: str | None,
           api_key_file: Path | None, db_url: str | None) -> None:
    """Remove NAME; refused while its instances run, unless --drain."""
    catalogue = _catalogue(app, db_url)
    entry = catalogue.get(name)
    if drain and catalogue.running_instances(name):
        url = _url(app, festinad_url)
        client.call(url, "POST", "/admin/drain-model", {"model": entry.profile}, api_key=api_key(api_key_file))
        deadline = time.monotonic() + timeout_s
        while catalogue.running_instances(name) and time.monotonic() < deadline:
            time.sleep(0.5)
    catalogue.remove(name)
    click.echo(f"removed {name}")


def _url(app: AppContext, option: str | None) -> str:
    return festinad_url(app, option)
