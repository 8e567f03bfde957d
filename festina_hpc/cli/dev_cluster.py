"""``festina dev-cluster up|down|status``: a real Slurm cluster on loopback, with festina-node on every node, for
development and tests."""

from __future__ import annotations

from pathlib import Path

import click

from festina_hpc import devcluster
from festina_hpc.cli.common import echo_json, json_option
from festina_hpc.cli.params import duration
from festina_hpc.db.engine import mask_url

base_dir_option = click.option("--base-dir", type=click.Path(path_type=Path, file_okay=False),
                               default=devcluster.DEFAULT_BASE_DIR, show_default=True,
                               help="Folder holding the cluster's config, state, logs and pid files.")


@click.group("dev-cluster")
def dev_cluster() -> None:
    """A local Slurm cluster (munge, slurmctld, N slurmd on 127.0.0.1) for development and tests; needs root."""


@dev_cluster.command("up")
@base_dir_option
@click.option("--install", is_flag=True, help="apt-get install the Slurm and munge packages if missing.")
@click.option("--nodes", type=int, default=4, show_default=True)
@click.option("--gpus-per-node", type=int, default=2, show_default=True, help="Fake GPUs (gpu:h100:N,mps:100N).")
@click.option("--ctld-port", type=int, default=26817, show_default=True)
@click.option("--slurmd-port", type=int, default=27001, show_default=True,
              help="Port of n1; node i listens on this + i - 1.")
@click.option("--suspend-time", "suspend_time_s", type=duration(whole_s=True), default=10, show_default=True,
              help="Idle time before power saving powers a node down: whole seconds or 5m (Slurm's SuspendTime).")
@click.option("--power-save-nodes", type=int, default=1, show_default=True,
              help="How many nodes (the last ones) power saving may power down; the others stay on.")
@click.option("--festina-node/--no-festina-node", "festina_node", default=True, show_default=True,
              help="Run `festina-node serve` (simulated GPUs) on every node.")
@click.option("--node-port", type=int, default=28001, show_default=True,
              help="festina-node's signed control port on n1; node i listens on this + i - 1.")
@click.option("--db-url", default="", help="The database festinad and the nodes share, e.g. a PostgreSQL URL "
                                           "[default: sqlite:///<base-dir>/festina.db].")
def up_cmd(base_dir: Path, install: bool, nodes: int, gpus_per_node: int, ctld_port: int, slurmd_port: int,
           suspend_time_s: int, power_save_nodes: int, festina_node: bool, node_port: int, db_url: str) -> None:
    """Start a fresh cluster, wait until every node is idle, print the SLURM_CONF and FESTINA_DB_URL export lines
    (festinad must use that database: the nodes write their energy there)."""
    cfg = devcluster.DevClusterConfig(base_dir=base_dir.resolve(), nodes=nodes, gpus_per_node=gpus_per_node,
                                      ctld_port=ctld_port, slurmd_port=slurmd_port, suspend_time_s=suspend_time_s,
                                      power_save_nodes=power_save_nodes, festina_node=festina_node,
                                      node_port=node_port, db_url=db_url)
    devcluster.up(cfg, install=install)
    nodes_line = (f"; festina-node on every node (control ports {cfg.node_port}..{cfg.node_port + cfg.nodes - 1})"
                  if cfg.festina_node else "; no festina-node")
    click.echo(f"festina: dev cluster up: {cfg.nodes} nodes idle, slurmctld on 127.0.0.1:{cfg.ctld_port}"
               f"{nodes_line}; festinad must use the nodes' database below", err=True)
    click.echo(f"export SLURM_CONF={cfg.slurm_conf}")
    click.echo(f"export FESTINA_DB_URL={mask_url(cfg.database_url)}")


@dev_cluster.command("down")
@base_dir_option
def down_cmd(base_dir: Path) -> None:
    """Cancel all jobs and stop the cluster's daemons (by the PIDs in their pid files)."""
    stopped = devcluster.down(base_dir.resolve())
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else f"nothing runs in {base_dir}")


@dev_cluster.command("status")
@base_dir_option
@json_option
def status_cmd(base_dir: Path, as_json: bool) -> None:
    """Which daemons run, and each node's recorded power state."""
    st = devcluster.status(base_dir.resolve())
    if as_json:
        echo_json({"base_dir": str(base_dir), "running": st.running,
                   "slurm_conf": str(st.config.slurm_conf) if st.config else None,
                   "db_url": mask_url(st.config.database_url) if st.config else None,
                   "daemons": [{"name": d.name, "pid": d.pid, "running": d.running} for d in st.daemons],
                   "node_control_ports": _node_ports(st.config),
                   "power": dict(st.power)})
        return
    if st.config is None:
        click.echo(f"no dev cluster in {base_dir}")
        return
    click.echo(f"dev cluster in {base_dir}: {'running' if st.running else 'stopped'}")
    for d in st.daemons:
        click.echo(f"  {d.name:<15} {'running' if d.running else 'stopped':<8} pid {d.pid or '-'}")
    click.echo("  power: " + " ".join(f"{node}={state}" for node, state in st.power))
    if ports := _node_ports(st.config):  # what festinad's config needs to reach every node
        click.echo("  [node_control.ports] " + " ".join(f"{node} = {port}" for node, port in ports.items()))
    if st.running:
        click.echo(f"export SLURM_CONF={st.config.slurm_conf}")
        click.echo(f"export FESTINA_DB_URL={mask_url(st.config.database_url)}")


def _node_ports(cfg: devcluster.DevClusterConfig | None) -> dict[str, int]:
    """Each node's festina-node control port (festinad's ``[node_control.ports]``); none without festina-node."""
    if cfg is None or not cfg.festina_node:
        return {}
    return {node: cfg.node_control_port(node) for node in cfg.node_names}
