"""Builders for the node tests: a node agent on persistent simulated GPUs, a FakeSlurm, the fake MPS tool."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from festina_hpc.devcluster import DevClusterConfig, festina_node_executable, free_ports, missing_binaries
from festina_hpc.devcluster import down as devcluster_down
from festina_hpc.devcluster import up as devcluster_up
from festina_hpc.gpu.simulated import ManualClock
from festina_hpc.node.agent import NodeAgent
from festina_hpc.node.config import NodeConfig, NodePaths
from festina_hpc.node.hookenv import Directives, JobContext
from festina_hpc.node.main import _simulated_workloads
from festina_hpc.node.simulated import PersistentSimulatedGpu, PersistentSimulatedMps
from festina_hpc.node.state import StateFile
from festina_hpc.profiles.store import ProfileStore
from tests.conftest import REPO_PROFILES

FAKE_BIN = Path(__file__).resolve().parent / "bin"


@dataclass
class FakeSlurm:
    requeued: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    drained: list[tuple[str, str]] = field(default_factory=list)

    def requeue(self, job_id: int, nodelist: Sequence[str], timeout_s: float = 30.0) -> None:
        self.requeued.append((job_id, tuple(nodelist)))

    def drain(self, node: str, reason: str) -> None:
        self.drained.append((node, reason))


def make_job(job_id: int = 11, gpus: tuple[int, ...] = (0,), mps_pct: int | None = 40, clock_mhz: int | None = None,
             model: str | None = "llama-3.1-8b", node: str = "n1") -> JobContext:
    return JobContext(job_id, 0, "root", node, gpus, mps_pct, Directives(model, str(job_id), clock_mhz))


@dataclass
class SimNode:
    agent: NodeAgent
    gpu: PersistentSimulatedGpu
    mps: PersistentSimulatedMps
    clock: ManualClock
    slurm: FakeSlurm
    paths: NodePaths
    state: StateFile


@pytest.fixture
def sim_node(tmp_path: Path) -> Iterator[SimNode]:
    cfg = NodeConfig(state_dir=str(tmp_path / "state"))
    paths = NodePaths.of(cfg, "n1")
    clock = ManualClock(1000.0)
    store = ProfileStore(REPO_PROFILES)
    gpu = PersistentSimulatedGpu(paths.simulated_file, store, "h100-sxm-80gb", 2, clock)
    mps = PersistentSimulatedMps(paths.node_dir / "simulated-mps.json", 2)
    slurm = FakeSlurm()
    state = StateFile(paths.state_file, paths.lock_file)
    agent = NodeAgent("n1", gpu, mps, state, paths, slurm=slurm,
                      jobs_changed=_simulated_workloads(gpu, store, "llama-3.1-8b"), clock_min_interval_s=10.0,
                      clock=clock)
    node = SimNode(agent, gpu, mps, clock, slurm, paths, state)
    yield node
    for index in range(2):
        mps.stop(index)


@contextmanager
def live_node_cluster(prefix: str, nodes: int, ctld_start: int,
                      node_config: str | Callable[[DevClusterConfig], str]) -> Iterator[DevClusterConfig]:
    """A dev cluster of the test module's own (``nodes`` nodes of one GPU, no power saving, this
    checkout's hooks) with ``festina-node serve`` running for n1 on the dev cluster's node config
    plus ``node_config`` lines (or those a function of the cluster returns); stopped, each node reset
    and the folder removed afterwards."""
    if missing_binaries() or os.geteuid() != 0 or festina_node_executable() is None:
        pytest.skip("needs Slurm, root and an installed festina-node")
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    ctld = free_ports(1, start=ctld_start)
    # festina_node=False: this fixture runs its own festina-node serve for n1, on its own config.
    cfg = DevClusterConfig(base_dir=base, nodes=nodes, gpus_per_node=1, power_save_nodes=0, ctld_port=ctld,
                           slurmd_port=free_ports(nodes, start=ctld + 1), festina_node=False)
    devcluster_up(cfg)
    toml = base / "etc" / "festina-node.toml"
    extra = node_config(cfg) if callable(node_config) else node_config
    # The module's settings replace the dev cluster's own lines for the same keys (TOML refuses a key twice).
    keys = {line.split("=", 1)[0].strip() for line in extra.splitlines() if "=" in line}
    kept = [line for line in toml.read_text().splitlines() if line.split("=", 1)[0].strip() not in keys]
    toml.write_text("\n".join(kept) + "\n" + extra)
    exe = str(festina_node_executable())
    service = subprocess.Popen([exe, "--config", str(toml), "--node", "n1", "serve"],
                               stderr=(base / "log" / "festina-node-n1.log").open("w"),
                               env={**os.environ, "SLURM_CONF": str(cfg.slurm_conf)})
    try:
        yield cfg
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=15)
        for node in cfg.node_names:
            subprocess.run([exe, "--config", str(toml), "--node", node, "reset"], capture_output=True, check=False)
        devcluster_down(base)
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def private_munged(prefix: str = "festina-munge-") -> Iterator[Path]:
    """A munged of the test's own (its own key, its own socket); yields the socket path, stops it by pid after."""
    if shutil.which("munged") is None or shutil.which("mungekey") is None or shutil.which("unmunge") is None:
        pytest.skip("needs munge (munged, mungekey, munge, unmunge)")
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o711)  # 700 makes munged warn that the socket is inaccessible
    key, sock, pid_file = folder / "munge.key", folder / "munge.socket", folder / "munged.pid"
    subprocess.run(["mungekey", "-c", "-k", str(key), "-b", "1024"], check=True, capture_output=True)
    key.chmod(0o600)
    # --force: munged refuses to run as root otherwise.
    subprocess.run(["munged", "--force", "-S", str(sock), f"--key-file={key}", f"--pid-file={pid_file}",
                    f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munged.seed'}"],
                   check=True, capture_output=True)
    try:
        yield sock
    finally:
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        shutil.rmtree(folder, ignore_errors=True)
