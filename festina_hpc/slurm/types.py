"""What the Slurm client returns and takes: frozen records of jobs, nodes, GRES and a serving-job spec.

The records carry Slurm's own words (job states such as ``RUNNING``, node
states such as ``idle`` plus flags such as ``DRAIN`` or ``POWERED_DOWN``) so
nothing is lost in translation; a few properties answer the questions the
daemon asks (is this node powered, can it take work).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True)
class Gres:
    """One generic resource: ``gpu:h100:2`` is Gres("gpu", "h100", 2); ``mps:50`` is Gres("mps", None, 50)."""

    name: str  # "gpu", "mps", "shard"
    type: str | None
    count: int

    def spec(self) -> str:
        """The ``--gres`` form, e.g. ``gpu:h100:2``."""
        return ":".join([self.name, *([self.type] if self.type else []), str(self.count)])


class PowerState(Enum):
    """Where a node stands in Slurm's power saving cycle."""

    ON = "on"
    POWERING_DOWN = "powering_down"  # SuspendProgram ran; waiting SuspendTimeout
    OFF = "off"  # POWERED_DOWN
    POWERING_UP = "powering_up"  # ResumeProgram ran; waiting for slurmd to register


@dataclass(frozen=True)
class SlurmNode:
    name: str
    state: str  # base state, lower case: idle, mixed, allocated, down, unknown, future, ...
    flags: tuple[str, ...]  # upper case: DRAIN, POWERED_DOWN, POWERING_DOWN, POWERING_UP, NOT_RESPONDING, ...
    reason: str  # drain/down reason, "" when none
    cpus: int
    alloc_cpus: int
    gres: tuple[Gres, ...]  # configured, e.g. gpu:h100:2 and mps:h100:200
    gres_used: tuple[Gres, ...]  # allocated now, same names
    partitions: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    address: str = ""  # NodeAddr: where a serving job on it is reached; "" when Slurm does not say

    def _count(self, gres: tuple[Gres, ...], name: str) -> int:
        return sum(g.count for g in gres if g.name == name)

    @property
    def gpus_total(self) -> int:
        return self._count(self.gres, "gpu")

    @property
    def gpus_used(self) -> int:
        return self._count(self.gres_used, "gpu")

    @property
    def mps_total(self) -> int:
        """MPS share units configured (100 per GPU when Count=100*GPUs)."""
        return self._count(self.gres, "mps")

    @property
    def mps_used(self) -> int:
        return self._count(self.gres_used, "mps")

    @property
    def drained(self) -> bool:
        """Drained or draining: takes no new jobs."""
        return "DRAIN" in self.flags

    @property
    def power_state(self) -> PowerState:
        if "POWERED_DOWN" in self.flags:
            return PowerState.OFF
        if "POWERING_DOWN" in self.flags or "POWER_DOWN" in self.flags:
            return PowerState.POWERING_DOWN
        if "POWERING_UP" in self.flags:
            return PowerState.POWERING_UP
        return PowerState.ON


@dataclass(frozen=True)
class SlurmJob:
    job_id: int
    name: str
    state: str  # upper case Slurm job state: PENDING, RUNNING, COMPLETING, COMPLETED, CANCELLED, FAILED, ...
    reason: str  # state reason, "None" when none (Slurm's word)
    nodes: tuple[str, ...]  # nodes it runs on (expanded), () while pending
    gres: tuple[Gres, ...]  # what it asked for per node, e.g. (Gres("mps", None, 25),)
    gres_detail: tuple[str, ...]  # what it got, e.g. ("gpu:h100:1(IDX:0)",); () when Slurm does not say
    comment: str
    user: str
    account: str
    partition: str
    required_nodes: tuple[str, ...] = ()  # --nodelist / NodeList=
    excluded_nodes: tuple[str, ...] = ()  # --exclude / ExcNodeList=
    restart_count: int = 0
    submit_time_s: int | None = None  # epoch seconds
    start_time_s: int | None = None
    tres_alloc: str = ""
    # When it ended, epoch seconds; None until it has (Slurm's EndTime of a running job is its time limit's end,
    # which is not read). Set from COMPLETING on.
    end_time_s: int | None = None
    # How its batch script ended, as Slurm's ``ExitCode=<exit_code>:<exit_signal>``; None until it ended.
    exit_code: int | None = None
    exit_signal: int | None = None

    @property
    def held(self) -> bool:
        return self.state == "PENDING" and self.reason.startswith(("JobHeld", "job requeued in held state"))


# Job states after which the job will not run again (unless requeued by someone).
FINISHED_JOB_STATES = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                                 "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
# States in which Slurm's end time and exit code are the job's own: it has ended (COMPLETING: its epilog runs).
ENDED_JOB_STATES = FINISHED_JOB_STATES | {"COMPLETING"}


@dataclass(frozen=True)
class ServingJobSpec:
    """One model instance as one Slurm batch job. Exactly one of ``mps_pct`` and ``gpus`` is set."""

    model: str  # e.g. "llama-3.1-8b"
    instance_id: str  # festina's id of the instance, unique per model
    command: tuple[str, ...]  # argv the job runs (exec'd, so signals from Slurm reach it)
    output_path: str  # absolute; may hold Slurm's %j
    mps_pct: int | None = None  # --gres=mps:K: K% of one GPU's SMs
    gpus: int | None = None  # --gres=gpu[:type]:N: whole GPUs
    gpu_type: str | None = None  # only with gpus
    nodelist: tuple[str, ...] = ()  # --nodelist
    exclude: tuple[str, ...] = ()  # --exclude
    job_name: str | None = None  # default: festina-<model>-<instance>
    comment: str | None = None  # default: festina:model=<model>,instance=<instance>
    partition: str | None = None
    account: str | None = None  # --account: whose allocation the job is charged to; default the submitter's
    time_limit: str | None = None  # Slurm's format, e.g. "1-00:00:00"; default: the partition's
    hold: bool = False  # submit held (sbatch --hold)
    env: tuple[tuple[str, str], ...] = field(default=())  # extra exported variables, in order
