"""Builders for the node tests: a node agent on persistent simulated GPUs, a FakeSlurm, the fake MPS tool."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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
