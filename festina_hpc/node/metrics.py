"""festina-node's read-only outputs beside the control service: a Prometheus port and jobs' AdminComment.

Both read the node's state file (``NodeAgent.status()``: what the hooks and
the control tick last settled) and nothing privileged, each in a thread of
its own so neither can delay the control loop.

- ``NodeMetrics`` turns the state into a ``MetricsSnapshot``: per GPU its
  energy counter and its power over the last settled interval (the counter's
  difference over the time between two readings, so no extra NVML read);
  per model (the job comment's ``model=``, else ``unknown``) the power of its
  jobs' SM shares and the energy of every job this exporter has seen, which
  only grows although jobs come and go; per MPS job and GPU its share and,
  where the controller wants another, that wanted share (a running
  instance's share is fixed, so it is one for festinad to restart the
  instance at). ``start_metrics_server`` serves it with prometheus_client's
  own small HTTP server (``metrics_port``; 0 = off, bound to
  ``metrics_addr``, 127.0.0.1 unless the site opens it).
- ``CommentWriter`` writes each running job's energy so far into its Slurm
  AdminComment every ``admin_comment_period_s``. Slurm 22.05 refuses the
  update once a job has finished, and that already holds in the Epilog (the
  job is COMPLETING: measured on the local cluster, "Job has already finished
  for job N"), so the last value written while the job ran is the one that
  stays: it lags the job's final total by at most one period. A refusal or a
  silent slurmctld is logged, never raised. A job spread over several nodes
  gets each node's own share (festina's serving jobs are single-node).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import start_http_server

from festina_hpc.accounting.admin_comment import energy_comment
from festina_hpc.accounting.metrics import GpuFigures, MetricsSnapshot, ModelFigures, ShareFigures, build_registry
from festina_hpc.node.attribution import split_energy
from festina_hpc.node.state import NodeState
from festina_hpc.slurm.errors import SlurmCommandError, SlurmError

logger = logging.getLogger(__name__)

UNKNOWN_MODEL = "unknown"  # a job whose comment names no model


class NodeMetrics:
    """The node's snapshot on each call (see the module docstring); thread-safe."""

    def __init__(self, node: str, read_state: Callable[[], NodeState]):
        self.node = node
        self._read = read_state
        self._lock = threading.Lock()
        self._last: dict[int, tuple[float, float]] = {}  # GPU -> (read_at_s, counter_j) of the last snapshot
        self._power_w: dict[int, float] = {}  # GPU -> power over its last settled interval
        self._job_energy_j: dict[int, tuple[str, float]] = {}  # job id -> (model, its energy so far)

    def snapshot(self) -> MetricsSnapshot:
        state = self._read()
        with self._lock:
            gpus = []
            model_power_w: dict[str, float] = {}
            for index, rec in sorted(state.gpus.items()):
                if rec.counter_j is None or rec.read_at_s is None:
                    continue
                before = self._last.get(index)
                if before is not None and rec.read_at_s > before[0] and rec.counter_j >= before[1]:
                    self._power_w[index] = (rec.counter_j - before[1]) / (rec.read_at_s - before[0])
                self._last[index] = (rec.read_at_s, rec.counter_j)
                power_w = self._power_w.get(index)
                gpus.append(GpuFigures(self.node, index, power_w, rec.counter_j))
                if power_w is not None and rec.jobs:
                    by_job, _idle = split_energy(power_w, {j.job_id: j.sm_pct for j in rec.jobs})
                    for job in rec.jobs:
                        model = job.model or UNKNOWN_MODEL
                        model_power_w[model] = model_power_w.get(model, 0.0) + by_job[job.job_id]
            self._update_jobs(state)
            energy: dict[str, float] = {}
            for model, energy_j in self._job_energy_j.values():
                energy[model] = energy.get(model, 0.0) + energy_j
            models = tuple(ModelFigures(m, model_power_w.get(m, 0.0), energy[m], None)
                           for m in sorted(energy))
            shares = tuple(ShareFigures(self.node, index, j.job_id, j.sm_pct, j.desired_sm_pct)
                           for index, rec in sorted(state.gpus.items()) for j in rec.jobs if j.uses_mps)
            return MetricsSnapshot(gpus=tuple(gpus), models=models, shares=shares)

    def _update_jobs(self, state: NodeState) -> None:
        """Each running job's energy over all its GPUs; a finished job keeps the last value seen."""
        totals: dict[int, tuple[str, float]] = {}
        for rec in state.gpus.values():
            for job in rec.jobs:
                model, energy_j = totals.get(job.job_id, (job.model or UNKNOWN_MODEL, 0.0))
                totals[job.job_id] = (model, energy_j + job.energy_j)
        self._job_energy_j.update(totals)


def start_metrics_server(port: int, addr: str, source: Callable[[], MetricsSnapshot]) -> Any:
    """Serve ``GET /metrics`` on ``addr:port`` in a daemon thread; returns the server (``shutdown()`` stops it)."""
    server, _thread = start_http_server(port, addr=addr, registry=build_registry(source))
    return server


@dataclass(frozen=True)
class JobTotal:
    job_id: int
    energy_j: float  # over all of this node's GPUs


def job_totals(state: NodeState) -> list[JobTotal]:
    """Each job on the node with its energy so far, summed over its GPUs."""
    totals: dict[int, float] = {}
    for rec in state.gpus.values():
        for job in rec.jobs:
            totals[job.job_id] = totals.get(job.job_id, 0.0) + job.energy_j
    return [JobTotal(job_id, energy_j) for job_id, energy_j in sorted(totals.items())]


class _CommentClient(Protocol):
    """The part of ``SlurmClient`` the writer uses."""

    def set_admin_comment(self, job_id: int, text: str) -> None: ...


class CommentWriter:
    """Writes running jobs' energy into their AdminComment every ``period_s`` (see the module docstring)."""

    def __init__(self, node: str, read_state: Callable[[], NodeState], client: _CommentClient, period_s: float):
        self.node = node
        self._read = read_state
        self._client = client
        self._period_s = period_s
        self._written: dict[int, str] = {}  # job id -> text last written: unchanged texts are not re-sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="festina-node-admin-comment", daemon=True)

    def write_once(self) -> dict[int, str]:
        """One pass: the texts written now, by job id. Never raises: refusals and errors are logged."""
        written: dict[int, str] = {}
        try:
            totals = job_totals(self._read())
        except Exception:  # noqa: BLE001 - an unreadable state is the control loop's to report
            logger.exception("%s: AdminComment pass skipped: node state unreadable", self.node)
            return written
        for total in totals:
            text = energy_comment(total.energy_j)
            if self._written.get(total.job_id) == text:
                continue
            try:
                self._client.set_admin_comment(total.job_id, text)
            except SlurmCommandError as exc:
                if "already finished" in exc.stderr:
                    logger.info("%s job %d: finished; Slurm keeps its last AdminComment", self.node, total.job_id)
                    self._written[total.job_id] = text  # no use asking again
                else:
                    logger.warning("%s job %d: AdminComment not written: %s", self.node, total.job_id, exc)
                continue
            except SlurmError as exc:
                logger.warning("%s job %d: AdminComment not written: %s", self.node, total.job_id, exc)
                continue
            self._written[total.job_id] = written[total.job_id] = text
        running = {t.job_id for t in totals}
        for job_id in [j for j in self._written if j not in running]:
            del self._written[job_id]
        return written

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self.write_once()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class NodeOutputs:
    """What ``festina-node serve`` starts beside its control loop, per the config; ``stop()`` ends both."""

    def __init__(self, server: Any | None, writer: CommentWriter | None):
        self.server = server
        self.writer = writer

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.writer is not None:
            self.writer.stop()


def start_node_outputs(node: str, read_state: Callable[[], NodeState], *, metrics_port: int, metrics_addr: str,
                       comment_period_s: float, client: _CommentClient | None) -> NodeOutputs:
    """Start the metrics port (``metrics_port`` > 0) and the AdminComment writer (period > 0, a client)."""
    server = None
    if metrics_port > 0:
        server = start_metrics_server(metrics_port, metrics_addr, NodeMetrics(node, read_state).snapshot)
        logger.info("festina-node %s: metrics on http://%s:%d/metrics", node, metrics_addr, metrics_port)
    writer = None
    if comment_period_s > 0 and client is not None:
        writer = CommentWriter(node, read_state, client, comment_period_s)
        writer.start()
    return NodeOutputs(server, writer)
