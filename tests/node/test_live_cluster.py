"""festina-node in a real local Slurm cluster (simulated GPUs): hooks, shares, clocks, energy, crashes, fail-open."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from festina_hpc.db.engine import make_engine
from festina_hpc.db.store import GpuRecord, NodeRecord, Store
from festina_hpc.devcluster import DevClusterConfig, festina_node_executable, free_ports
from festina_hpc.slurm.cli_backend import CliSlurmClient
from tests.node.conftest import live_node_cluster

MODEL = "llama-3.1-8b"
GPU_TYPE = "h100-sxm-80gb"

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[DevClusterConfig, CliSlurmClient]]:
    """A cluster of its own (2 nodes, 1 GPU each, no power saving), so the hooks are this checkout's."""
    # A short hold before a lower clock, so the controller's first choice shows within the tests' deadlines.
    with live_node_cluster("festina-node-", 2, 21000, "control_period_s = 0.5\nclock_min_interval_s = 1.0\n") as cfg:
        yield cfg, CliSlurmClient(cfg.slurm_conf)


def sbatch(cfg: DevClusterConfig, *args: str) -> int:
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "SLURM_CONF": str(cfg.slurm_conf)})
    return int(done.stdout.strip().split(";")[0])


def wait_for(what: str, check: object, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def node_status(cfg: DevClusterConfig, node: str) -> dict[str, object]:
    path = cfg.base_dir / "node" / node / "state.json"
    if not path.exists():  # no prolog yet
        return {"gpus": {"0": {"jobs": []}}}
    data: dict[str, object] = json.loads(path.read_text())
    return data


def finished(client: CliSlurmClient, *job_ids: int) -> bool:
    jobs = {j.job_id: j for j in client.list_jobs()}
    return all(jobs[i].state in ("COMPLETED", "FAILED", "CANCELLED") for i in job_ids if i in jobs)


def test_two_models_on_one_gpu_shares_clock_and_energy(cluster: tuple[DevClusterConfig, CliSlurmClient]) -> None:
    cfg, client = cluster
    out = cfg.base_dir / "out"
    # As festinad does: an instance recorded per job, its id in the comment, linked to the job once sbatch
    # answers (held until then, so that no interval runs before the link), so the database charges each job.
    store = Store(make_engine(f"sqlite:///{cfg.base_dir / 'festina.db'}"))
    store.upsert_nodes([NodeRecord("n2", "idle", True, 1)])
    gpu_id = store.upsert_gpus([GpuRecord("n2", 0, GPU_TYPE)])[("n2", 0)]
    ids = []
    for pct, secs in ((40, 6), (50, 4)):
        instance_id = store.create_instance(MODEL, [gpu_id], at=datetime.now(UTC), sm_pct=pct)
        ids.append(sbatch(cfg, "-w", "n2", "--hold", f"--gres=mps:{pct}", f"--output={out}/mps-%j.out",
                          f"--comment=festina:model={MODEL},instance={instance_id},clock_mhz=1410",
                          "--job-name=m;touch /tmp/festina-pwned-name",
                          "--wrap", f"env | grep ^CUDA_MPS; sleep {secs}"))
        store.update_instance(instance_id, slurm_job_id=ids[-1])
    for job_id in ids:
        client.release(job_id)
    wait_for("both jobs on the GPU", lambda: len(node_status(cfg, "n2")["gpus"]["0"]["jobs"]) == 2)  # type: ignore[index]
    gpu = node_status(cfg, "n2")["gpus"]["0"]  # type: ignore[index]
    assert sum(j["sm_pct"] for j in gpu["jobs"]) <= 100 and gpu["clock_mhz"] == 1410 and gpu["mps"]
    wait_for("jobs done", lambda: finished(client, *ids))
    for job_id, pct in zip(ids, (40, 50)):
        env = (out / f"mps-{job_id}.out").read_text()
        assert f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={pct}" in env
        assert f"CUDA_MPS_PIPE_DIRECTORY={cfg.base_dir}/node/n2/mps/gpu0/pipe" in env
    wait_for("epilogs", lambda: not node_status(cfg, "n2")["gpus"]["0"]["jobs"])  # type: ignore[index]
    gpu = node_status(cfg, "n2")["gpus"]["0"]  # type: ignore[index]
    assert gpu["clock_mhz"] is None and not gpu["mps"]
    with sqlite3.connect(cfg.base_dir / "festina.db") as db:
        energy = dict(db.execute("SELECT job_id, energy_j FROM job_energy").fetchall())
        counters = [c for (c,) in db.execute("SELECT energy_counter_j FROM energy_samples s JOIN gpus g "
                                             "ON g.id = s.gpu_id JOIN nodes n ON n.id = g.node_id "
                                             "WHERE n.name = 'n2' ORDER BY sampled_at")]
        node_j, idle_j = db.execute("SELECT SUM(h.energy_j), SUM(h.idle_energy_j) FROM node_energy_hourly h "
                                    "JOIN nodes n ON n.id = h.node_id WHERE n.name = 'n2'").fetchone()
    assert set(ids) <= set(energy) and all(energy[i] > 0 for i in ids)
    delta_j = counters[-1] - counters[0]
    assert sum(energy[i] for i in ids) + gpu["idle_pool_j"] == pytest.approx(delta_j, rel=0.01)
    # The database's split is the node's: its node energy is the counters', its idle energy the idle pool's.
    assert (node_j, sum(energy[i] for i in ids) + idle_j) == pytest.approx((delta_j, delta_j), rel=0.01)
    assert gpu["idle_pool_j"] < 0.01 * delta_j  # the jobs overlapped: (almost) nothing was idle
    assert not Path("/tmp/festina-pwned-name").exists()


def test_a_comment_with_shell_metacharacters_changes_nothing(cluster: tuple[DevClusterConfig, CliSlurmClient]) -> None:
    cfg, client = cluster
    job = sbatch(cfg, "-w", "n2", "--gres=mps:20", "--output=/dev/null",
                 "--comment=festina:model=x;touch /tmp/festina-pwned,clock_mhz=$(touch /tmp/festina-pwned2)",
                 "--wrap", "sleep 1")
    wait_for("job done", lambda: finished(client, job))
    assert not Path("/tmp/festina-pwned").exists() and not Path("/tmp/festina-pwned2").exists()
    node = next(n for n in client.list_nodes() if n.name == "n2")
    assert "DRAIN" not in node.flags
    log = (cfg.base_dir / "etc" / "festina-hooks.log").read_text()
    assert f"job {job}: comment ignored" in log


def test_a_prolog_failure_inside_festina_leaves_the_node_up(cluster: tuple[DevClusterConfig, CliSlurmClient]) -> None:
    cfg, client = cluster
    state = cfg.base_dir / "node" / "n2" / "state.json"
    state.write_text("{broken")
    try:
        job = sbatch(cfg, "-w", "n2", "--gres=mps:30", "--output=/dev/null", "--wrap", "true")
        wait_for("job done", lambda: finished(client, job))
        job_state = next(j for j in client.list_jobs() if j.job_id == job).state
        assert job_state == "COMPLETED"
        node = next(n for n in client.list_nodes() if n.name == "n2")
        assert "DRAIN" not in node.flags and node.state in ("idle", "mixed")
        assert "prolog failed (fail open, node stays up)" in (cfg.base_dir / "etc" / "festina-hooks.log").read_text()
    finally:
        state.unlink()


def test_a_crashed_mps_daemon_is_restarted_and_the_job_requeued(
        cluster: tuple[DevClusterConfig, CliSlurmClient]) -> None:
    cfg, client = cluster
    job = sbatch(cfg, "-w", "n1", "--gres=mps:30", "--output=/dev/null", "--wrap", "sleep 4")
    wait_for("job on n1", lambda: any(j["job_id"] == job for j in node_status(cfg, "n1")["gpus"]["0"]["jobs"]))  # type: ignore[index]
    daemons = json.loads((cfg.base_dir / "node" / "n1" / "simulated-mps.json").read_text())
    os.kill(daemons["0"]["pid"], signal.SIGKILL)
    wait_for("requeue", lambda: getattr(client.get_job(job), "restart_count", 0) >= 1, timeout_s=20)
    wait_for("rerun done", lambda: finished(client, job), timeout_s=60)
    assert client.get_job(job).state == "COMPLETED"  # type: ignore[union-attr]
    assert node_status(cfg, "n1")["gpus"]["0"]["mps_restarts"] >= 1  # type: ignore[index]


def health(port: int) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            answer: dict[str, object] = json.loads(resp.read())
            return answer
    except OSError:
        return None


def test_the_control_loop_sets_the_clock_and_keeps_the_shares_the_servers_started_with(
        cluster: tuple[DevClusterConfig, CliSlurmClient]) -> None:
    """Two emulated model servers as MPS jobs on n1's GPU; festina-node's loop (0.5 s tick) runs festina's control."""
    cfg, client = cluster
    festina = str(Path(str(festina_node_executable())).parent / "festina")
    ports = [free_ports(1, start=27000), free_ports(1, start=27500)]
    started = (40, 50)
    ids = [sbatch(cfg, "-w", "n1", f"--gres=mps:{pct}", f"--output={cfg.base_dir}/out/serve-%j.out",
                  f"--comment=festina:model={MODEL},instance=ctl{i},port={port}",
                  "--wrap", f"exec {festina} serve --engine emulated --model {MODEL} --gpu-type {GPU_TYPE} "
                            f"--host 127.0.0.1 --port {port} --sm-pct {pct} --time-scale 2")
           for i, (pct, port) in enumerate(zip(started, ports))]
    try:
        def settled() -> bool:
            gpu = node_status(cfg, "n1")["gpus"]["0"]  # type: ignore[index]
            jobs = {j["job_id"]: j for j in gpu["jobs"]}
            if set(ids) - set(jobs) or gpu.get("clock_mhz") is None:
                return False
            reports = [health(port) for port in ports]
            return all(r is not None and r["clock_mhz"] == gpu["clock_mhz"] and jobs[i]["server_pid"] == r["pid"]
                       for i, r in zip(ids, reports))

        wait_for("the controller's clock on both servers", settled, timeout_s=45)
        gpu = node_status(cfg, "n1")["gpus"]["0"]  # type: ignore[index]
        assert gpu["clock_mhz"] < 1980  # two idle servers: festina runs the GPU slower than max
        # A running instance keeps the share it started with (--gres=mps:K, --sm-pct K): in the ledger, in
        # the server, and no MPS call tried to change it; a share the policy wants instead is only recorded.
        jobs = sorted(gpu["jobs"], key=lambda j: j["job_id"])
        assert [j["sm_pct"] for j in jobs] == list(started)
        assert [health(port)["sm_pct"] for port in ports] == list(started)  # type: ignore[index]
        assert all(j["desired_sm_pct"] is None or j["desired_sm_pct"] != j["sm_pct"] for j in jobs)
        daemons = json.loads((cfg.base_dir / "node" / "n1" / "simulated-mps.json").read_text())
        assert daemons["0"]["server_pct"] == {}
        with sqlite3.connect(cfg.base_dir / "festina.db") as db:
            settings = db.execute("SELECT details FROM decisions d JOIN gpus g ON g.id = d.gpu_id JOIN nodes n "
                                  "ON n.id = g.node_id WHERE d.kind = 'setting' AND n.name = 'n1'").fetchall()
        assert any(json.loads(d)["clock_mhz"] == gpu["clock_mhz"] for (d,) in settings)
    finally:
        for job_id in ids:
            client.cancel(job_id)
    wait_for("serving jobs gone", lambda: finished(client, *ids))
