"""``festina status`` (nodes, GPUs, instances, SLO attainment) and ``festina bench status`` (its render time)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from festina_hpc.admin import status as status_lib
from festina_hpc.cli.admin_options import slurm_client, slurm_conf_option
from festina_hpc.cli.common import AppContext, echo_json, json_option, pass_app
from festina_hpc.cli.db import db_url_option, open_engine
from festina_hpc.cli.params import POSITIVE_DURATION, duration
from festina_hpc.db.node_reports import READING_STALE_S
from festina_hpc.db.store import Store
from festina_hpc.slurm.errors import SlurmError

_EXAMPLES = """
\b
Examples:
  festina status                      # one screen
  festina status --json | jq '.models'
  festina status --watch 2            # refresh every 2 s (Ctrl-C stops)
  festina status --no-slurm --window-s 60
"""


@click.command("status", epilog=_EXAMPLES)
@click.option("--window-s", type=POSITIVE_DURATION, default=300.0, show_default=True,
              help="SLO attainment and power over this long back: seconds or 5m, 1h.")
@click.option("--stale-s", type=POSITIVE_DURATION, default=READING_STALE_S, show_default=True,
              help="A node's power reading older than this (seconds or 1m) is shown as unknown ('-').")
@click.option("--watch", "watch_s", type=duration(min_s=0.2), default=None,
              help="Refresh every DURATION (seconds or 1m) until interrupted.")
@click.option("--slurm/--no-slurm", "use_slurm", default=True, show_default=True,
              help="Ask Slurm for node state and power (else the database's last view).")
@slurm_conf_option
@db_url_option
@json_option
@pass_app
def status(app: AppContext, window_s: float, stale_s: float, watch_s: float | None, use_slurm: bool,
           slurm_conf: Path | None, db_url: str | None, as_json: bool) -> None:
    """Nodes (state, powered, GPUs), each GPU's instances with SM share, clock and power, SLO attainment per model.

    Clock, shares and power are what each GPU's festina-node last reported; a reading older than
    --stale-s is shown as unknown.
    """
    engine, _ = open_engine(app, db_url)
    try:
        Store(engine).check_schema()
        slurm = slurm_client(app, slurm_conf) if use_slurm else None
        while True:
            nodes = None
            if slurm is not None:
                try:
                    nodes = slurm.list_nodes()
                except SlurmError as exc:
                    click.echo(f"festina: warning: Slurm does not answer, node state from the database: {exc}",
                               err=True)
            snapshot = status_lib.collect(engine, now=datetime.now(UTC), window_s=window_s, slurm_nodes=nodes,
                                          stale_s=stale_s)
            if as_json:
                click.echo(json.dumps(status_lib.to_json(snapshot)))
            else:
                if watch_s is not None:
                    click.clear()
                click.echo(status_lib.render_text(snapshot))
            if watch_s is None:
                return
            time.sleep(watch_s)
    except KeyboardInterrupt:
        return
    finally:
        engine.dispose()


@click.command("status")
@click.option("--gpus", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=8, show_default=True)
@json_option
def bench_status(gpus: int, gpus_per_node: int, as_json: bool) -> None:
    """Seconds to collect and render `festina status` for a synthetic cluster (SQLite)."""
    result = status_lib.bench_status(gpus, gpus_per_node)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"{result['gpus']} GPUs, {result['instances']} instances: rendered in {result['render_s']:.3f} s")
