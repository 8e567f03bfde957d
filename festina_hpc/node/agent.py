"""The node agent: what the hooks and the control service do to a node's GPUs, over injected backends.

``NodeAgent`` holds no state of its own between calls: everything lives in
the node's ``StateFile``, changed inside one exclusive transaction per
operation, so a prolog, an epilog and the control service's tick never
interleave on one node. The GPU backend, MPS control, Slurm client and energy
sink are protocols built in ``main()``.

- ``prolog``: per GPU of the job, settle the energy counter (that is the
  job's snapshot), make sure the GPU's MPS control daemon runs (MPS jobs),
  lock the clock the head node put in the job comment, record the job.
- ``epilog``: settle, take the job off its GPUs and hand its energy to the
  sink; a GPU left without jobs gets its clock reset and its MPS daemon quit.
- ``task_prolog``: the ``export`` lines that point the job's CUDA at its
  GPU's MPS daemon with its share.
- ``control_tick``: settle every GPU (energy samples; an idle GPU's interval
  goes to its idle pool), restart a crashed MPS daemon and requeue the jobs
  that were its clients, and apply the clock
  the controller asked for: a lower clock only after ``clock_min_interval_s``
  since the last change (a higher one at once: SLOs first).

A running job's SM share does not change here. An MPS client's active-thread
percentage is fixed when its CUDA context is created (the task prolog's
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``); the control daemon's
``set_active_thread_percentage`` reaches only clients created later. So a
share asked for a running job is kept as its *wanted* share
(``JobOnGpu.desired_sm_pct`` in the state file, which ``festina-node status``
and festinad's ``status`` request show, logged once per change), which
festinad is to carry out by starting a new instance at that share and
stopping this one. Only where the site's engine has its own mechanism ([node]
``live_share_change``, as [gpu] ``live_share_change``) does the tick put a
wanted share in force in the ledger, at safe points (shrinks first; grows on
a later tick, once the shrinks are in force, and only while the shares fit
in 100%); the engine then hears it from the control loop's
``POST /admin/settings``.

Who asks for settings: festina-node's own local controller (``node/control.py``,
every tick, through ``plan_settings``), or an operator over the socket
(``request_settings``; the controller, when on, overrides it on its next tick).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from festina_hpc.errors import GpuPermissionError
from festina_hpc.gpu.base import GpuBackend, MpsControl
from festina_hpc.node.attribution import split_energy
from festina_hpc.node.config import NodePaths
from festina_hpc.node.errors import NodeInputError
from festina_hpc.node.hookenv import JobContext
from festina_hpc.node.state import GpuRecord, JobOnGpu, NodeState, StateFile
from festina_hpc.slurm.errors import SlurmError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobShare:
    """A job's part of the energy of one settled interval (``attribution.split_energy``'s rule)."""

    job_id: int
    instance: str | None  # the instance label of the job's comment (festinad's: the database's instance id)
    fraction: float  # of the interval's energy, 0..1; a GPU's jobs' fractions sum to 1


@dataclass(frozen=True)
class GpuReading:
    """One settled reading of a GPU's energy counter, and how the interval it closes was split."""

    gpu_index: int
    at_s: float  # wall clock
    counter_j: float
    power_w: float
    # The jobs on the GPU during the interval since its previous reading, with their parts. Empty: the
    # interval was idle (the GPU's idle pool), or this is the GPU's first reading (no interval).
    shares: tuple[JobShare, ...] = ()


@dataclass(frozen=True)
class JobEnergy:
    """A job's GPU energy on this node over one run (prolog to epilog)."""

    job_id: int
    user: str
    model: str | None
    instance: str | None
    started_at_s: float
    ended_at_s: float
    energy_j_by_gpu: Mapping[int, float]

    @property
    def energy_j(self) -> float:
        return sum(self.energy_j_by_gpu.values())


class EnergySink(Protocol):
    """Where readings and job totals go (the database, or only the log)."""

    def readings(self, node: str, readings: Sequence[GpuReading]) -> None: ...

    def job_energy(self, node: str, record: JobEnergy) -> None: ...


class LogSink:
    """An ``EnergySink`` that only logs: a node without a database still accounts in its log."""

    def readings(self, node: str, readings: Sequence[GpuReading]) -> None:
        for r in readings:
            logger.debug("%s GPU %d: counter %.1f J, %.1f W", node, r.gpu_index, r.counter_j, r.power_w)

    def job_energy(self, node: str, record: JobEnergy) -> None:
        logger.info("%s: job %d used %.1f J of GPU energy", node, record.job_id, record.energy_j)


class SafePoints(Protocol):
    def ready(self, gpu_index: int, job_id: int) -> bool:
        """Whether the job's engine may take a new SM share now (``live_share_change`` only)."""
        ...


class EverySafe:
    """Every tick is a safe point: an engine that changes its share itself does so between its steps."""

    def ready(self, gpu_index: int, job_id: int) -> bool:
        return True


@dataclass(frozen=True)
class TickReport:
    """What one control tick did."""

    readings: tuple[GpuReading, ...] = ()
    mps_restarted: tuple[int, ...] = ()  # GPU indexes
    requeued: tuple[int, ...] = ()  # job ids
    clock_changes: Mapping[int, int] = field(default_factory=dict)  # GPU index -> MHz applied
    share_changes: Mapping[int, float] = field(default_factory=dict)  # job id -> share applied (live_share_change)


JobsChanged = Callable[[int, Sequence[JobOnGpu]], None]


class NodeAgent:
    def __init__(self, node: str, backend: GpuBackend, mps: MpsControl, state: StateFile, paths: NodePaths, *,
                 sink: EnergySink | None = None, slurm: _Requeuer | None = None,
                 jobs_changed: JobsChanged | None = None, safe_points: SafePoints | None = None,
                 clock_min_interval_s: float = 10.0, clock: Callable[[], float] = time.time,
                 live_share_change: bool = False, job_secrets: Callable[[JobOnGpu], str | None] | None = None):
        """``live_share_change``: the engine changes a running instance's SM share itself (see the module
        docstring); False (the default, and MPS's rule) keeps a share asked for as the job's wanted share.
        ``job_secrets``: a job's model server secret (``control.JobSecrets``), what festinad's
        ``instance_secret`` asks for an adopted job; None: none known."""
        self.node = node
        self._backend = backend
        self._mps = mps
        self._state = state
        self._paths = paths
        self._sink = sink or LogSink()
        self._slurm = slurm
        self._jobs_changed = jobs_changed
        self._safe = safe_points or EverySafe()
        self._clock_min_interval_s = clock_min_interval_s
        self._clock = clock
        self._live_share_change = live_share_change
        self.job_secrets: Callable[[JobOnGpu], str | None] = job_secrets or (lambda job: None)

    @property
    def live_share_change(self) -> bool:
        return self._live_share_change

    # -- helpers -----------------------------------------------------------------------------------------------

    def _check_gpu(self, index: int) -> None:
        count = self._backend.device_count()
        if not 0 <= index < count:
            raise NodeInputError(f"GPU {index}: this node has {count} GPUs (0..{count - 1})")

    def _settle(self, rec: GpuRecord, now_s: float) -> tuple[GpuRecord, GpuReading]:
        """Bring the GPU's ledger up to its counter now: split the delta among its jobs (see attribution)."""
        counter_j = self._backend.energy_j(rec.index)
        power_w = self._backend.power_w(rec.index)
        reading = GpuReading(rec.index, now_s, counter_j, power_w)
        if rec.counter_j is None:
            return replace(rec, counter_j=counter_j, read_at_s=now_s), reading
        delta_j = counter_j - rec.counter_j
        if delta_j < 0:
            # The counter restarts with the driver: this interval is lost, not negative.
            logger.warning("%s GPU %d: energy counter went back (%.1f -> %.1f J); interval not attributed",
                           self.node, rec.index, rec.counter_j, counter_j)
            delta_j = 0.0
        present = {j.job_id: j.sm_pct for j in rec.jobs}
        by_job, idle_j = split_energy(delta_j, present)
        # The same rule on a unit of energy gives each job's fraction, which the sink stores with the
        # reading (the database splits its own difference of the counter by it), even where delta is 0.
        fractions, _ = split_energy(1.0, present)
        reading = replace(reading, shares=tuple(JobShare(j.job_id, j.instance, fractions[j.job_id])
                                                for j in rec.jobs if fractions[j.job_id] > 0))
        jobs = tuple(replace(j, energy_j=j.energy_j + by_job[j.job_id]) for j in rec.jobs)
        return replace(rec, jobs=jobs, counter_j=counter_j, read_at_s=now_s,
                       idle_pool_j=rec.idle_pool_j + idle_j), reading

    def _ensure_mps(self, rec: GpuRecord) -> GpuRecord:
        pipe, log = self._paths.mps_pipe_dir(rec.index), self._paths.mps_log_dir(rec.index)
        if self._mps.running(rec.index, pipe):
            self._mps.attach(rec.index, pipe, log)
        else:
            self._mps.start(rec.index, pipe, log)
            logger.info("%s GPU %d: MPS control daemon started (pipe %s)", self.node, rec.index, pipe)
        return replace(rec, mps=True)

    def _notify(self, rec: GpuRecord) -> None:
        if self._jobs_changed is not None:
            self._jobs_changed(rec.index, rec.jobs)

    # -- hooks -------------------------------------------------------------------------------------------------

    def prolog(self, ctx: JobContext) -> tuple[GpuReading, ...]:
        if ctx.comment_ignored:
            logger.warning("%s job %d: comment ignored: %s", self.node, ctx.job_id, ctx.comment_ignored)
        readings = []
        now_s = self._clock()
        with self._state.transaction() as box:
            for index in ctx.gpus:
                self._check_gpu(index)
                rec, reading = self._settle(box.state.gpu(index), now_s)
                readings.append(reading)
                if ctx.mps_pct is not None:
                    rec = self._ensure_mps(rec)
                wanted_mhz = ctx.directives.clock_mhz
                if wanted_mhz is not None:
                    applied = self._backend.lock_clocks(index, wanted_mhz)
                    if applied is not None:
                        rec = replace(rec, clock_mhz=applied, clock_changed_at_s=now_s, desired_clock_mhz=None)
                        logger.info("%s GPU %d: clock locked at %d MHz for job %d", self.node, index, applied,
                                    ctx.job_id)
                job = JobOnGpu(job_id=ctx.job_id, uid=ctx.uid, user=ctx.user,
                               sm_pct=float(ctx.mps_pct if ctx.mps_pct is not None else 100),
                               started_at_s=now_s, start_counter_j=reading.counter_j, model=ctx.directives.model,
                               instance=ctx.directives.instance, uses_mps=ctx.mps_pct is not None,
                               port=ctx.directives.port)
                rec = rec.with_job(job)
                box.state = box.state.with_gpu(rec)
                self._notify(rec)
        self._sink.readings(self.node, readings)
        return tuple(readings)

    def epilog(self, ctx: JobContext) -> JobEnergy | None:
        readings = []
        energy: dict[int, float] = {}
        started_s: float | None = None
        job_seen: JobOnGpu | None = None
        now_s = self._clock()
        with self._state.transaction() as box:
            for index in ctx.gpus:
                self._check_gpu(index)
                rec, reading = self._settle(box.state.gpu(index), now_s)
                readings.append(reading)
                job = rec.job(ctx.job_id)
                if job is not None:
                    job_seen = job
                    energy[index] = job.energy_j
                    started_s = job.started_at_s if started_s is None else min(started_s, job.started_at_s)
                    rec = rec.without_job(ctx.job_id)
                if not rec.jobs:
                    rec = self._idle(rec, now_s)
                box.state = box.state.with_gpu(rec)
                self._notify(rec)
        self._sink.readings(self.node, readings)
        if job_seen is None or started_s is None:
            logger.info("%s job %d: no prolog record (not a festina-tracked job); nothing to account",
                        self.node, ctx.job_id)
            return None
        record = JobEnergy(ctx.job_id, ctx.user, job_seen.model, job_seen.instance, started_s, now_s, energy)
        self._sink.job_energy(self.node, record)
        return record

    def _idle(self, rec: GpuRecord, now_s: float) -> GpuRecord:
        """A GPU without jobs: default clocks, no MPS daemon."""
        try:
            self._backend.reset_clocks(rec.index)
        except GpuPermissionError as exc:
            logger.warning("%s GPU %d: %s", self.node, rec.index, exc)
        if rec.mps:
            pipe, log = self._paths.mps_pipe_dir(rec.index), self._paths.mps_log_dir(rec.index)
            if self._mps.running(rec.index, pipe):
                self._mps.attach(rec.index, pipe, log)
                self._mps.stop(rec.index)
            logger.info("%s GPU %d: idle: clocks reset, MPS control daemon stopped", self.node, rec.index)
        return replace(rec, clock_mhz=None, clock_changed_at_s=now_s, desired_clock_mhz=None, mps=False)

    def task_prolog(self, ctx: JobContext) -> list[str]:
        return task_prolog_lines(ctx, self._paths)

    # -- the control service -------------------------------------------------------------------------------------

    def control_tick(self) -> TickReport:
        now_s = self._clock()
        readings: list[GpuReading] = []
        restarted: list[int] = []
        crashed_jobs: list[int] = []
        clocks: dict[int, int] = {}
        shares: dict[int, float] = {}
        with self._state.transaction() as box:
            for index in range(self._backend.device_count()):
                # Idle GPUs are settled too: their energy goes to their idle pool tick by tick, so the
                # database's node energy keeps up with the counters, not only when the next job starts.
                rec, reading = self._settle(box.state.gpu(index), now_s)
                readings.append(reading)
                if not rec.jobs:
                    box.state = box.state.with_gpu(rec)
                    continue
                pipe, log = self._paths.mps_pipe_dir(index), self._paths.mps_log_dir(index)
                if rec.mps and not self._mps.running(index, pipe):
                    logger.error("%s GPU %d: MPS control daemon is gone; restarting it and requeueing its clients",
                                 self.node, index)
                    self._mps.stop(index)  # forget the dead one (a no-op where it was never ours)
                    self._mps.start(index, pipe, log)
                    rec = replace(rec, mps_restarts=rec.mps_restarts + 1)
                    restarted.append(index)
                    crashed_jobs += [j.job_id for j in rec.jobs if j.uses_mps]
                rec = self._apply_clock(rec, now_s, clocks)
                if self._live_share_change:
                    rec = self._apply_shares(rec, shares)
                box.state = box.state.with_gpu(rec)
                if any(j.job_id in shares for j in rec.jobs):
                    self._notify(rec)
        self._sink.readings(self.node, readings)
        requeued = []
        for job_id in dict.fromkeys(crashed_jobs):
            if self._slurm is None:
                logger.error("%s job %d: lost its MPS daemon and no Slurm client is configured to requeue it",
                             self.node, job_id)
                continue
            try:
                self._slurm.requeue(job_id, [self.node])
                requeued.append(job_id)
                logger.warning("%s job %d: requeued after its MPS daemon crashed", self.node, job_id)
            except SlurmError as exc:
                logger.error("%s job %d: requeue after an MPS crash failed: %s", self.node, job_id, exc)
        return TickReport(tuple(readings), tuple(restarted), tuple(requeued), clocks, shares)

    def _apply_clock(self, rec: GpuRecord, now_s: float, applied: dict[int, int]) -> GpuRecord:
        wanted = rec.desired_clock_mhz
        if wanted is None:
            return rec
        current = rec.clock_mhz if rec.clock_mhz is not None else self._backend.current_clock_mhz(rec.index)
        waited_s = now_s - rec.clock_changed_at_s if rec.clock_changed_at_s is not None else float("inf")
        if wanted < current and waited_s < self._clock_min_interval_s:
            return rec  # a lower clock saves energy but can wait; a higher one protects SLOs and cannot
        mhz = self._backend.lock_clocks(rec.index, wanted)
        if mhz is None:
            return replace(rec, desired_clock_mhz=None)
        applied[rec.index] = mhz
        return replace(rec, clock_mhz=mhz, clock_changed_at_s=now_s, desired_clock_mhz=None)

    def _apply_shares(self, rec: GpuRecord, applied: dict[int, float]) -> GpuRecord:
        """Wanted shares into the ledger, for an engine that changes its share itself (``live_share_change``).

        Nothing is sent to MPS: no MPS call reaches a running client (see the module docstring); the
        engine hears its share from the control loop's ``POST /admin/settings``.
        """
        pending = [j for j in rec.jobs if j.desired_sm_pct is not None and j.desired_sm_pct != j.sm_pct]
        shrinks = [j for j in pending if (j.desired_sm_pct or 0) < j.sm_pct]
        # Grows wait for a tick on which no shrink is pending, so that a grown share always finds room.
        batch = shrinks if shrinks else pending
        for job in batch:
            if not self._safe.ready(rec.index, job.job_id):
                continue
            assert job.desired_sm_pct is not None
            others = sum(j.sm_pct for j in rec.jobs if j.job_id != job.job_id)
            if others + job.desired_sm_pct > 100.0 + 1e-9:
                continue
            rec = rec.with_job(replace(job, sm_pct=job.desired_sm_pct, desired_sm_pct=None))
            applied[job.job_id] = job.desired_sm_pct
        return rec

    def _note_wanted(self, index: int, before: JobOnGpu, after: JobOnGpu) -> None:
        """Log a job's wanted share once, when it changes (the controller re-plans it every tick)."""
        wanted = after.desired_sm_pct
        if self._live_share_change or wanted is None or wanted == before.desired_sm_pct:
            return
        logger.info("%s GPU %d job %d: wants an SM share of %g%% (runs at %g%%); a share is fixed when the "
                    "instance starts, so it takes a restart at that share (festinad's)", self.node, index,
                    after.job_id, wanted, after.sm_pct)

    # -- requests over the control socket ------------------------------------------------------------------------

    def request_settings(self, index: int, clock_mhz: int | None, sm_pct: Mapping[int, float]) -> None:
        """Ask for a clock and SM shares on GPU ``index``; the control loop applies the clock (rate limits).

        A share becomes the job's wanted share (the module docstring), put in force by the tick only
        with ``live_share_change``.
        """
        self._check_gpu(index)
        if clock_mhz is not None and (isinstance(clock_mhz, bool) or not isinstance(clock_mhz, int)
                                      or clock_mhz <= 0):
            raise NodeInputError(f"GPU {index}: clock_mhz = {clock_mhz!r} must be a positive integer")
        with self._state.transaction() as box:
            rec = box.state.gpu(index)
            for job_id, pct in sm_pct.items():
                if isinstance(pct, bool) or not isinstance(pct, int | float) or not 1 <= pct <= 100:
                    raise NodeInputError(f"GPU {index}: sm_pct of job {job_id} = {pct!r} must be in 1..100")
                if rec.job(job_id) is None:
                    raise NodeInputError(f"GPU {index}: job {job_id} does not run on this GPU")
            final = {j.job_id: float(sm_pct.get(j.job_id, j.sm_pct)) for j in rec.jobs}
            if sum(final.values()) > 100.0 + 1e-9:
                raise NodeInputError(f"GPU {index}: SM shares {final} sum to {sum(final.values()):g}, more than 100")
            for job_id, pct in sm_pct.items():
                job = rec.job(job_id)
                assert job is not None
                asked = replace(job, desired_sm_pct=None if float(pct) == job.sm_pct else float(pct))
                self._note_wanted(index, job, asked)
                rec = rec.with_job(asked)
            if clock_mhz is not None:
                rec = replace(rec, desired_clock_mhz=clock_mhz)
            box.state = box.state.with_gpu(rec)

    def plan_settings(self, index: int, clock_mhz: int | None, sm_pct: Mapping[int, float],
                      server_pids: Mapping[int, int]) -> None:
        """The local controller's wish for GPU ``index``; replaces whatever was pending there.

        ``clock_mhz`` None keeps the clock in force; a job missing from ``sm_pct`` keeps its share.
        A share other than the job's is its wanted share (the module docstring), never put in force
        here. Unlike ``request_settings`` it never refuses: jobs gone since the controller looked are
        skipped, and grows are cut to the room the other jobs' shares leave once the shrinks are
        in force (jobs the controller does not steer count too), so shares never sum above 100.
        ``server_pids`` are model server processes already checked to belong to their jobs (what
        ``drain_instance`` signals).
        """
        self._check_gpu(index)
        with self._state.transaction() as box:
            rec = box.state.gpu(index)
            wanted = {j.job_id: float(sm_pct[j.job_id]) for j in rec.jobs
                      if j.uses_mps and j.job_id in sm_pct and 1 <= sm_pct[j.job_id] <= 100}
            current = {j.job_id: j.sm_pct for j in rec.jobs}
            grows = [i for i in wanted if wanted[i] > current[i]]
            room = 100.0 - sum(pct for i, pct in {**current, **wanted}.items() if i not in grows)
            for i in grows:  # shrinks always fit; grows share what is left, in the controller's order
                wanted[i] = max(current[i], min(wanted[i], room))
                room -= wanted[i]
            for job in rec.jobs:
                pct = wanted.get(job.job_id)
                planned = replace(job, desired_sm_pct=None if pct == job.sm_pct else pct,
                                  server_pid=server_pids.get(job.job_id, job.server_pid))
                self._note_wanted(index, job, planned)
                rec = rec.with_job(planned)
            rec = replace(rec, desired_clock_mhz=None if clock_mhz == rec.clock_mhz else clock_mhz)
            box.state = box.state.with_gpu(rec)

    def lock_clock(self, index: int, clock_mhz: int) -> int | None:
        """Lock GPU ``index``'s clock now (an operator's or festinad's direct request)."""
        self._check_gpu(index)
        with self._state.transaction() as box:
            applied = self._backend.lock_clocks(index, clock_mhz)
            if applied is not None:
                box.state = box.state.with_gpu(replace(box.state.gpu(index), clock_mhz=applied,
                                                       clock_changed_at_s=self._clock(), desired_clock_mhz=None))
            return applied

    def reset_clock(self, index: int) -> None:
        self._check_gpu(index)
        with self._state.transaction() as box:
            self._backend.reset_clocks(index)
            box.state = box.state.with_gpu(replace(box.state.gpu(index), clock_mhz=None,
                                                   clock_changed_at_s=self._clock(), desired_clock_mhz=None))

    def set_power_limit(self, index: int, power_w: float) -> None:
        self._check_gpu(index)
        with self._state.transaction():
            self._backend.set_power_limit_w(index, power_w)

    def mps_start(self, index: int) -> None:
        self._check_gpu(index)
        with self._state.transaction() as box:
            box.state = box.state.with_gpu(self._ensure_mps(box.state.gpu(index)))

    def mps_stop(self, index: int) -> None:
        self._check_gpu(index)
        with self._state.transaction() as box:
            rec = box.state.gpu(index)
            if rec.jobs:
                raise NodeInputError(f"GPU {index}: jobs {[j.job_id for j in rec.jobs]} use its MPS daemon")
            box.state = box.state.with_gpu(self._idle(rec, self._clock()))

    def reset_all(self) -> None:
        """Every GPU back to defaults, every MPS daemon festina started stopped (an operator's clean-up)."""
        with self._state.transaction() as box:
            now_s = self._clock()
            for index in range(self._backend.device_count()):
                rec = box.state.gpu(index)
                box.state = box.state.with_gpu(replace(self._idle(rec, now_s), jobs=()))

    def status(self) -> NodeState:
        return self._state.read()


def task_prolog_refusal(ctx: JobContext) -> str:
    """Why the task prolog refuses an MPS job its MPS variables; "" when it refuses nothing.

    An MPS share on several GPUs gets none: festina runs one MPS control daemon per GPU and a task's CUDA
    talks to one only. A whole-GPU job needs none, which is no refusal.
    """
    if ctx.mps_pct is not None and len(ctx.gpus) != 1:
        return f"an MPS share of {ctx.mps_pct}% on {len(ctx.gpus)} GPUs {list(ctx.gpus)} (one MPS daemon per GPU)"
    return ""


def task_prolog_lines(ctx: JobContext, paths: NodePaths) -> list[str]:
    """``export`` lines for the task (TaskProlog stdout); none for whole-GPU jobs or several GPUs.

    Slurm reads these lines itself (no shell); the paths come from the config, which allows no spaces.
    """
    if ctx.mps_pct is None or task_prolog_refusal(ctx):
        return []
    index = ctx.gpus[0]
    return [f"export CUDA_MPS_PIPE_DIRECTORY={paths.mps_pipe_dir(index)}",
            f"export CUDA_MPS_LOG_DIRECTORY={paths.mps_log_dir(index)}",
            f"export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={ctx.mps_pct}"]


class _Requeuer(Protocol):
    """The part of ``SlurmClient`` the agent uses."""

    def requeue(self, job_id: int, nodelist: Sequence[str], timeout_s: float = 30.0) -> None: ...
