"""The node's persistent state: per GPU, the jobs on it, its energy ledger, clock and MPS daemon.

Slurm's hooks are separate short-lived processes, and the control service is
another: they share one JSON file per node, read and written under an
exclusive ``flock`` (``StateFile.transaction``), written atomically (temp
file + rename) so a crash never leaves half a file. The records are frozen
dataclasses; a transaction hands out the current ``NodeState`` and takes back
the new one.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from festina_hpc.node.errors import NodeError


@dataclass(frozen=True)
class JobOnGpu:
    job_id: int
    uid: int
    user: str
    sm_pct: float  # MPS share in force (100 for a whole GPU)
    started_at_s: float  # wall clock at the prolog
    start_counter_j: float  # the GPU's energy counter at the prolog
    model: str | None = None
    instance: str | None = None
    energy_j: float = 0.0  # attributed so far
    # The share the controller (or an operator) wants for it, None = its own. MPS fixes a running
    # client's share, so this is what festinad restarts the instance at; only with live_share_change
    # does the control tick put it in force (at a safe point).
    desired_sm_pct: float | None = None
    uses_mps: bool = False  # a client of the GPU's MPS daemon (an --gres=mps job)
    port: int | None = None  # its model server's port on this node (job comment), for the control loop
    server_pid: int | None = None  # its model server's process, checked to belong to the job (drain_instance)


@dataclass(frozen=True)
class GpuRecord:
    index: int
    jobs: tuple[JobOnGpu, ...] = ()
    counter_j: float | None = None  # the counter reading last settled
    read_at_s: float | None = None
    idle_pool_j: float = 0.0  # energy of intervals without any job
    clock_mhz: int | None = None  # clock festina locked; None = driver default
    clock_changed_at_s: float | None = None
    desired_clock_mhz: int | None = None  # a clock waiting for the rate limit
    mps: bool = False  # festina runs an MPS control daemon for this GPU
    mps_restarts: int = 0

    def job(self, job_id: int) -> JobOnGpu | None:
        return next((j for j in self.jobs if j.job_id == job_id), None)

    def with_job(self, job: JobOnGpu) -> GpuRecord:
        return replace(self, jobs=tuple(j for j in self.jobs if j.job_id != job.job_id) + (job,))

    def without_job(self, job_id: int) -> GpuRecord:
        return replace(self, jobs=tuple(j for j in self.jobs if j.job_id != job_id))


@dataclass(frozen=True)
class NodeState:
    gpus: Mapping[int, GpuRecord] = field(default_factory=dict)

    def gpu(self, index: int) -> GpuRecord:
        return self.gpus.get(index) or GpuRecord(index)

    def with_gpu(self, gpu: GpuRecord) -> NodeState:
        return NodeState({**self.gpus, gpu.index: gpu})

    def to_json(self) -> str:
        return json.dumps({"gpus": {str(i): asdict(g) for i, g in sorted(self.gpus.items())}}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> NodeState:
        data = json.loads(text)
        gpus: dict[int, GpuRecord] = {}
        for key, raw in data["gpus"].items():
            jobs = tuple(JobOnGpu(**j) for j in raw.pop("jobs"))
            gpus[int(key)] = GpuRecord(**raw, jobs=jobs)
        return cls(gpus)


class StateBox:
    """The state inside a transaction: read ``state``, assign a new one to change it."""

    def __init__(self, state: NodeState):
        self.state = state


class StateFile:
    def __init__(self, path: Path, lock_path: Path):
        self.path = path
        self.lock_path = lock_path

    def read(self) -> NodeState:
        """The state as last written (no lock: for status displays)."""
        return self._load()

    def _load(self) -> NodeState:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return NodeState()
        except OSError as exc:
            raise NodeError(f"{self.path}: cannot read node state: {exc.strerror}") from None
        try:
            return NodeState.from_json(text)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NodeError(f"{self.path}: unreadable node state ({exc.__class__.__name__}: {exc})") from None

    @contextmanager
    def transaction(self) -> Iterator[StateBox]:
        """Exclusive: load, let the caller change the box, write it back if it changed (not on an exception)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise NodeError(f"{self.lock_path}: cannot open the node lock: {exc.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            before = self._load()
            box = StateBox(before)
            yield box
            if box.state != before:
                self._write(box.state)
        finally:
            os.close(lock)

    def _write(self, state: NodeState) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(state.to_json(), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            raise NodeError(f"{self.path}: cannot write node state: {exc.strerror}") from None


def as_plain(state: NodeState) -> dict[str, Any]:
    """The state as JSON-ready data (``festina-node status --json``)."""
    result: dict[str, Any] = json.loads(state.to_json())
    return result
