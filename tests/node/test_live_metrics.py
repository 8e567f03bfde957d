"""festina-node's metrics port and AdminComment writer in a real local Slurm cluster (simulated GPU).

Also pins the Slurm behaviour the writer is built around: 22.05 refuses an
AdminComment update from the Epilog (the job is COMPLETING, "already
finished"), so festina-node writes the running total while the job runs and
that value is what ``scontrol show job`` keeps while MinJobAge holds the job.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from festina_hpc.devcluster import DevClusterConfig, free_ports
from tests.node.conftest import live_node_cluster

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[DevClusterConfig, int]]:
    """One node, one GPU, this checkout's hooks, and festina-node serving metrics and writing AdminComments."""
    metrics_port = free_ports(1, start=24010)
    with live_node_cluster("festina-nm-", 1, 24000, "control_period_s = 0.5\nadmin_comment_period_s = 0.5\n"
                                                    f"metrics_port = {metrics_port}\n") as cfg:
        yield cfg, metrics_port


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 30.0) -> object:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)
    return result


def scontrol(cfg: DevClusterConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "SLURM_CONF": str(cfg.slurm_conf)})


def admin_comment(cfg: DevClusterConfig, job_id: int) -> tuple[str, float | None]:
    shown = scontrol(cfg, "-o", "show", "job", str(job_id)).stdout
    state = re.search(r"JobState=(\S+)", shown)
    energy = re.search(r"AdminComment=festina_energy_j=(\d+),", shown)
    return (state[1] if state else "?"), (float(energy[1]) if energy else None)


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""  # the service is still starting


def test_running_job_energy_reaches_admin_comment_and_metrics(cluster: tuple[DevClusterConfig, int]) -> None:
    cfg, port = cluster
    done = subprocess.run(["sbatch", "--parsable", "-w", "n1", "--gres=mps:50", "--output=/dev/null",
                           "--comment=festina:model=llama-3.1-8b,instance=1", "--wrap", "sleep 6"],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "SLURM_CONF": str(cfg.slurm_conf)})
    job_id = int(done.stdout.strip().split(";")[0])
    wait_for("an AdminComment while the job runs", lambda: admin_comment(cfg, job_id)[1], timeout_s=30)
    text = wait_for("the model's energy on the metrics port",
                    lambda: (t := scrape(port)) and 'festina_model_energy_joules_total{model="llama-3.1-8b"}' in t
                    and t)
    assert 'festina_gpu_energy_joules_total{gpu="0",node="n1"}' in str(text)
    wait_for("job finished", lambda: admin_comment(cfg, job_id)[0] == "COMPLETED", timeout_s=40)
    state, energy_j = admin_comment(cfg, job_id)
    assert energy_j is not None and energy_j > 0  # what was written while it ran stays while MinJobAge keeps it
    # Slurm 22.05 refuses any later update: the reason festina-node writes while the job runs.
    refused = scontrol(cfg, "update", f"JobId={job_id}", "AdminComment=late")
    assert refused.returncode != 0 and "already finished" in refused.stderr
    # The hooks and the writer failed open: the node stays up.
    sinfo = subprocess.run(["sinfo", "-h", "-n", "n1", "-o", "%T"], capture_output=True, text=True, check=True,
                           env={**os.environ, "SLURM_CONF": str(cfg.slurm_conf)}).stdout.strip()
    assert sinfo in ("idle", "mixed")
