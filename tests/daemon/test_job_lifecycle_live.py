"""Issue 21 on a dev cluster of its own: festina-node serves on every node, the nodes' epilogs and festinad
share the database the cluster prints, and festinad's reconcile brings each ended job's row to Slurm's end.

Three GPU jobs run to their ends (``exit 0``, ``exit 3``, one ``scancel``-ed); each node's epilog records
the job (festina-node, COMPLETING) in the shared SQLite file while festina-node's control ticks write
there too; one festinad reconcile later every row holds the final state, the end time and the exit code.
The module's last test stops the cluster and checks the festina-node daemons went with it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from festina_hpc import devcluster
from festina_hpc.daemon.festinad import Festinad, FestinadSettings
from festina_hpc.daemon.gateway import gateway_models
from festina_hpc.db.engine import make_engine
from festina_hpc.db.store import Store
from festina_hpc.devcluster import DevClusterConfig
from festina_hpc.policy.base import PolicyContext, make_policy
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.slurm.cli_backend import CliSlurmClient
from tests.daemon.conftest import own_dev_cluster

pytestmark = pytest.mark.slurm

GPU = "h100-sxm-80gb"
RECONCILE_PERIOD_S = 2.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevClusterConfig]:
    yield from own_dev_cluster("festina-jobs", 21700, power_save_nodes=0)


def _sbatch(cfg: DevClusterConfig, *args: str) -> int:
    out = subprocess.run(["sbatch", "--parsable", "--gres=gpu:1", f"--output={cfg.base_dir}/out/%j.out", *args],
                         env={**os.environ, "SLURM_CONF": str(cfg.slurm_conf)}, capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip().split(";")[0])


def _rows(cfg: DevClusterConfig) -> dict[int, tuple[str, object, int | None, int | None]]:
    engine = make_engine(cfg.database_url)
    try:
        with engine.connect() as conn:
            return {r.job_id: (r.state, r.end_at, r.exit_code, r.exit_signal) for r in conn.execute(
                text("SELECT job_id, state, end_at, exit_code, exit_signal FROM slurm_jobs"))}
    finally:
        engine.dispose()


def test_every_node_runs_festina_node_on_the_printed_database(cluster: DevClusterConfig) -> None:
    st = devcluster.status(cluster.base_dir)
    nodes = {d.name: d.running for d in st.daemons if d.name.startswith("festina-node")}
    assert nodes == {f"festina-node {n}": True for n in cluster.node_names}
    assert cluster.database_url == f"sqlite:///{cluster.base_dir / 'festina.db'}"


def test_ended_jobs_have_end_state_and_exit_code_after_one_reconcile(cluster: DevClusterConfig,
                                                                      store: ProfileStore) -> None:
    done = _sbatch(cluster, "--wrap", "sleep 1")
    failed = _sbatch(cluster, "--wrap", "sleep 1; exit 3")
    cancelled = _sbatch(cluster, "--wrap", "sleep 300")
    jobs = (done, failed, cancelled)
    time.sleep(3)
    subprocess.run(["scancel", str(cancelled)], env={**os.environ, "SLURM_CONF": str(cluster.slurm_conf)},
                   check=True)
    # Each epilog (festina-node) records its job, COMPLETING and without an end, in the shared database.
    deadline = time.monotonic() + 60
    while not set(jobs) <= set(_rows(cluster)):
        assert time.monotonic() < deadline, f"the epilogs recorded only {sorted(_rows(cluster))} of {jobs}"
        time.sleep(0.5)
    client = CliSlurmClient(cluster.slurm_conf, timeout_s=20.0)
    deadline = time.monotonic() + 60
    while any(j.state == "COMPLETING" for j in client.list_jobs()):
        assert time.monotonic() < deadline, "jobs still COMPLETING after 60 s"
        time.sleep(0.5)

    async def one_reconcile() -> None:
        policy = make_policy("festina", PolicyContext(store, GPU))
        slos = {m.name: m.slo for m in gateway_models(store, GPU, ("llama-3.1-8b",))}
        db = Store(make_engine(cluster.database_url))
        festinad = Festinad(policy, store, client, db, slos,
                            FestinadSettings(job_output_dir=str(cluster.base_dir / "out")))
        try:
            await festinad.setup()  # setup() is festinad's first reconcile
        finally:
            await festinad.close()
            db.engine.dispose()

    started = time.monotonic()
    asyncio.run(one_reconcile())
    assert time.monotonic() - started < RECONCILE_PERIOD_S * 5, "one reconcile took longer than a few periods"
    rows = _rows(cluster)
    assert (rows[done][0], rows[done][2], rows[done][3]) == ("COMPLETED", 0, 0)
    assert (rows[failed][0], rows[failed][2], rows[failed][3]) == ("FAILED", 3, 0)
    assert rows[cancelled][0] == "CANCELLED" and rows[cancelled][2] is not None
    assert all(rows[j][1] is not None for j in jobs), {j: rows[j] for j in jobs}


def test_the_nodes_wrote_beside_festinad_without_a_lock_error(cluster: DevClusterConfig) -> None:
    logs = {p.name: p.read_text(errors="replace") for p in (cluster.base_dir / "log").glob("*")
            if p.is_file()}
    assert not [name for name, body in logs.items() if "database is locked" in body]
    engine = make_engine(cluster.database_url)
    try:
        with engine.connect() as conn:
            samples = conn.execute(text("SELECT count(*) FROM energy_samples")).scalar_one()
    finally:
        engine.dispose()
    assert samples > 0  # the control ticks recorded energy the whole time


def test_down_stops_the_festina_node_daemons(cluster: DevClusterConfig) -> None:
    pids = {d.name: d.pid for d in devcluster.status(cluster.base_dir).daemons if d.name.startswith("festina-node")}
    stopped = devcluster.down(cluster.base_dir)
    assert set(pids) <= set(stopped)
    assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
               for pid in pids.values())
    assert not any(d.running for d in devcluster.status(cluster.base_dir).daemons)
