"""``festina consolidate``, ``festina nodes ...``, ``festina decisions`` and ``festina completion``.

Thin: consolidation is festinad's (``festina_hpc/daemon/admin_api.py``), nodes are Slurm's
(``SlurmClient.drain/resume``) except a GPU's clock and an instance's drain, which festinad
sends to the node signed (``/admin/node-control``), and the audit trail is the database's
(``Store.decisions``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import click
from click.shell_completion import get_completion_class

from festina_hpc.admin import client
from festina_hpc.cli.admin_options import (
    api_key,
    api_key_option,
    festinad_url,
    festinad_url_option,
    slurm_client,
    slurm_conf_option,
)
from festina_hpc.cli.common import AppContext, echo_json, json_option, pass_app
from festina_hpc.cli.db import db_url_option, open_engine
from festina_hpc.cli.params import TIME
from festina_hpc.db.models import DECISION_KINDS
from festina_hpc.db.store import DecisionRow, Store
from festina_hpc.errors import FestinaError


def _print_plan(plan: dict[str, Any], applied: bool) -> None:
    if not plan.get("plan_id"):
        click.echo("nothing to consolidate now")
        return
    verb = "applied" if applied else "would apply"
    click.echo(f"plan {plan['plan_id']} ({plan['reason']}): {verb} {plan['actions']} action(s)")
    for m in plan["migrations"]:
        click.echo(f"  migrate instance {m['instance_id']} ({m['model']}, job {m['slurm_job_id']}) "
                   f"{m['from_node']} -> {m['to_node']} GPU {m['to_gpu_indexes']} at SM {m['sm_pct']:g}%")
    for node in plan["power_off"]:
        click.echo(f"  power off {node} (left to Slurm's power saving)")
    for node in plan["power_on"]:
        click.echo(f"  power on {node}")
    click.echo(f"  requeues (job replaced on its new node): {len(plan['requeues'])}")
    click.echo(f"  nodes freed: {', '.join(plan['nodes_freed']) or 'none'}")
    click.echo(f"  energy saved over {plan['horizon_s']:g} s: {plan['energy_saved_j'] / 3.6e6:.3f} kWh "
               f"({plan['energy_saved_j']:.0f} J; migrations cost {plan['migration_cost_j']:.0f} J)")
    if applied:
        click.echo(f"  migrations done: {plan['migrations_done']}, failed: {plan['migrations_failed']}")


_CONSOLIDATE_EXAMPLES = """
\b
Examples:
  festina consolidate --dry-run                 # the plan now, with its plan id
  festina consolidate --apply --plan-id 3f2a9c0d1e4b   # carry out exactly that plan
  festina consolidate --apply --json            # the plan now, carried out
"""


@click.command("consolidate", epilog=_CONSOLIDATE_EXAMPLES)
@click.option("--dry-run/--apply", "dry_run", default=True, show_default=True,
              help="Print the plan the policy would carry out now, or carry it out through festinad.")
@click.option("--plan-id", default=None, help="With --apply: the plan --dry-run printed (refused if stale or applied).")
@festinad_url_option
@api_key_option
@json_option
@pass_app
def consolidate(app: AppContext, dry_run: bool, plan_id: str | None, festinad_url: str | None,
                api_key_file: Path | None, as_json: bool) -> None:
    """Consolidation now: migrations, requeues, nodes freed, energy saved over the policy's horizon."""
    url = _url(app, festinad_url)
    key = api_key(api_key_file)
    if dry_run:
        if plan_id is not None:
            raise click.UsageError("--plan-id goes with --apply")
        plan = client.call(url, "GET", "/admin/consolidate", api_key=key)
    else:
        if plan_id is None:
            current = client.call(url, "GET", "/admin/consolidate", api_key=key)
            if not current.get("plan_id"):
                raise FestinaError("nothing to consolidate now: nothing done")
            plan_id = str(current["plan_id"])
        plan = client.call(url, "POST", "/admin/consolidate", {"plan_id": plan_id}, api_key=key)
    if as_json:
        echo_json(plan)
    else:
        _print_plan(plan, applied=not dry_run)


def _url(app: AppContext, option: str | None) -> str:
    return festinad_url(app, option)


@click.group("nodes")
def nodes() -> None:
    """Slurm nodes: drain (no new jobs) and resume; a GPU's clock and an instance's drain through festinad.

    \b
    Examples:
      festina nodes drain gpu07 --reason "NVLink errors, ticket 4711"
      festina nodes resume gpu07
      festina nodes set-clock gpu07 0 1410      # lock GPU 0 of gpu07 at 1410 MHz
      festina nodes reset-clock gpu07 0
      festina nodes drain-instance gpu07 0 4711 # job 4711's model server drains, then exits
    """


def _known_node(app: AppContext, slurm_conf: Path | None, node: str) -> Any:
    slurm = slurm_client(app, slurm_conf)
    names = sorted(n.name for n in slurm.list_nodes())
    if node not in names:
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise FestinaError(f"node = {node!r} is not a Slurm node (known: {shown or 'none'})")
    return slurm


@nodes.command("drain")
@click.argument("node")
@click.option("--reason", required=True, help="Why (Slurm shows it in `sinfo -R`).")
@slurm_conf_option
@pass_app
def drain(app: AppContext, node: str, reason: str, slurm_conf: Path | None) -> None:
    """Drain NODE: running jobs finish, no new ones start; festinad stops placing there."""
    if not reason.strip():
        raise FestinaError("reason = '' must say why the node is drained")
    _known_node(app, slurm_conf, node).drain(node, reason)
    click.echo(f"drained {node}: {reason}")


@nodes.command("resume")
@click.argument("node")
@click.option("--reason", default="", help="Noted in the output (Slurm clears the drain reason).")
@slurm_conf_option
@pass_app
def resume(app: AppContext, node: str, reason: str, slurm_conf: Path | None) -> None:
    """Resume NODE after a drain."""
    _known_node(app, slurm_conf, node).resume(node)
    click.echo(f"resumed {node}" + (f": {reason}" if reason else ""))


def _node_control(app: AppContext, festinad_url_opt: str | None, api_key_file: Path | None, node: str, op: str,
                  args: dict[str, Any]) -> Any:
    """festinad signs and sends it (``POST /admin/node-control``): festina-node takes such requests from no one else."""
    answer = client.call(festinad_url(app, festinad_url_opt), "POST", "/admin/node-control",
                         {"node": node, "op": op, "args": args}, timeout_s=60.0, api_key=api_key(api_key_file))
    return answer.get("result")


@nodes.command("set-clock")
@click.argument("node")
@click.argument("gpu", type=click.IntRange(min=0))
@click.argument("clock_mhz", type=click.IntRange(min=1))
@festinad_url_option
@api_key_option
@pass_app
def set_clock(app: AppContext, node: str, gpu: int, clock_mhz: int, festinad_url: str | None,
              api_key_file: Path | None) -> None:
    """Lock GPU index GPU of NODE at CLOCK_MHZ (the GPU rounds to a clock it supports)."""
    locked = _node_control(app, festinad_url, api_key_file, node, "lock_clocks", {"gpu": gpu, "clock_mhz": clock_mhz})
    click.echo(f"{node} GPU {gpu}: clock locked at {locked} MHz")


@nodes.command("reset-clock")
@click.argument("node")
@click.argument("gpu", type=click.IntRange(min=0))
@festinad_url_option
@api_key_option
@pass_app
def reset_clock(app: AppContext, node: str, gpu: int, festinad_url: str | None,
                api_key_file: Path | None) -> None:
    """Give GPU index GPU of NODE its default clocks back."""
    _node_control(app, festinad_url, api_key_file, node, "reset_clocks", {"gpu": gpu})
    click.echo(f"{node} GPU {gpu}: default clocks")


@nodes.command("drain-instance")
@click.argument("node")
@click.argument("gpu", type=click.IntRange(min=0))
@click.argument("job_id", type=click.IntRange(min=1))
@festinad_url_option
@api_key_option
@pass_app
def drain_instance(app: AppContext, node: str, gpu: int, job_id: int, festinad_url: str | None,
                   api_key_file: Path | None) -> None:
    """Drain the model server of Slurm job JOB_ID on GPU index GPU of NODE: it finishes its requests, then exits."""
    pid = _node_control(app, festinad_url, api_key_file, node, "drain_instance", {"gpu": gpu, "job_id": job_id})
    click.echo(f"{node} GPU {gpu}: job {job_id}'s server (pid {pid}) is draining")


@click.command("decisions", epilog="""
\b
Examples:
  festina decisions --since 1h
  festina decisions --since 2026-03-01T12:00 --kind migration --json
""")
@click.option("--since", type=TIME, default="1h", show_default=True,
              help="An ISO 8601 date or date-time (UTC without an offset) or a duration back from now: 30s, 10m, "
                   "2h, 1h30m, 7d.")
@click.option("--kind", type=click.Choice(DECISION_KINDS), default=None, help="Only this kind.")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
@db_url_option
@json_option
@pass_app
def decisions(app: AppContext, since: datetime, kind: str | None, limit: int, db_url: str | None,
              as_json: bool) -> None:
    """The audit trail: placements, setting changes, scaling, migrations, power, each with its reason."""
    start = since
    engine, _ = open_engine(app, db_url)
    try:
        store = Store(engine)
        store.check_schema()
        rows = store.decisions(since=start, kind=kind, limit=limit)
    finally:
        engine.dispose()
    if as_json:
        echo_json({"since": start.isoformat(), "decisions": [
            {"id": r.id, "decided_at": r.decided_at.isoformat(), "kind": r.kind, "action": r.action, "model": r.model,
             "instance_id": r.instance_id, "node": r.node_name, "gpu_index": r.gpu_index, "gpu_id": r.gpu_id,
             "node_id": r.node_id, "count": r.times_decided, "last_decided_at": r.last_decided_at.isoformat(),
             "reason": r.reason, "details": r.details} for r in rows]})
        return
    if not rows:
        click.echo(f"no decisions since {start.isoformat(timespec='seconds')}")
    for r in rows:
        click.echo(decision_line(r))


def decision_line(row: DecisionRow) -> str:
    """One line of ``festina decisions``: what an admin knows the cluster by (node n3, gpu1, the instance and
    model); a row whose node or GPU is gone keeps its database id; a repeated decision its count and last time."""
    node = row.node_name or (f"node_id={row.node_id}" if row.node_id is not None else "")
    gpu = f"gpu{row.gpu_index}" if row.gpu_index is not None else (
        f"gpu_id={row.gpu_id}" if row.gpu_id is not None else "")
    target = [f"model={row.model}" if row.model else "",
              f"instance={row.instance_id}" if row.instance_id is not None else "", node, gpu]
    repeated = (f" (x{row.times_decided}, last {row.last_decided_at.isoformat(timespec='seconds')})"
                if row.times_decided > 1 else "")
    return (f"{row.decided_at.isoformat(timespec='seconds')} {row.kind:9} {row.action:15} "
            f"{' '.join(t for t in target if t)}{repeated}  -- {row.reason}")


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    Examples:
      eval "$(festina completion bash)"                       # this shell
      festina completion bash > /etc/bash_completion.d/festina
      festina completion fish > ~/.config/fish/completions/festina.fish
    """
    from festina_hpc.cli.main import cli

    cls = get_completion_class(shell)
    assert cls is not None  # the three choices are click's built-in shells
    click.echo(cls(cli, {}, "festina", "_FESTINA_COMPLETE").source())
