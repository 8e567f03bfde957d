"""The store festinad writes through and rebuilds itself from: cluster state, outcomes, energy, decisions.

The daemon must not hold state only in memory, so everything it knows of nodes, GPUs,
Slurm jobs and model instances goes through here, and ``load_live_state`` gives it
back after a restart (instances not yet stopped, with their GPUs and jobs). Records
that arrive at request rate (request outcomes, energy samples) are written in batches,
one multi-row statement per call.

Contracts:
- Inputs are frozen dataclasses; outputs are frozen dataclasses detached from any
  session, so a caller never holds a session or an ORM object.
- Every public method is one transaction. Input is validated before anything is
  written; a bad value is an ``InvalidRecord`` naming the record, the field and the
  value, and the call stores nothing (a batch is all or nothing). What the database
  itself refuses (a foreign key, a CHECK) is a one-line ``DatabaseError``, also rolled back.
- Times are timezone-aware datetimes passed in by the caller (the daemon's clock):
  the store reads the clock only for ``updated_at`` bookkeeping, through ``clock``.
- Ids of nodes, GPUs and instances are the database's, and the ones the policy sees.
- Instance phases only move forward (loading, ready, draining, stopped).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, and_, case, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from festina_hpc.db.engine import first_line, mask_url, unavailable, writer_engine
from festina_hpc.db.errors import DatabaseError, InvalidRecord
from festina_hpc.db.ingest import (
    HOUR_S,
    BatchPlan,
    BatchResult,
    Cursor,
    EnergyReading,
    InstanceInfo,
    lookup,
    plan_batch,
    read_cursors,
    validate_readings,
    write_plan,
    write_readings,
)
from festina_hpc.db.models import (
    Base,
    Decision,
    Gpu,
    InstanceEnergy,
    InstanceGpu,
    JobEnergy,
    ModelInstance,
    Node,
    RequestInFlight,
    RequestRecord,
    SlurmJob,
    TenantTokensHourly,
)
from festina_hpc.db.validation import check_integer as _integer
from festina_hpc.db.validation import check_not_before as _not_before
from festina_hpc.db.validation import check_number as _number
from festina_hpc.db.validation import check_text as _text
from festina_hpc.db.validation import check_time as _time
from festina_hpc.policy.types import (
    Action,
    Drop,
    GpuSettings,
    InstancePhase,
    Migrate,
    MoveQueued,
    Placement,
    Plan,
    PowerOff,
    PowerOn,
    Route,
    StartInstance,
    StopInstance,
)
from festina_hpc.slurm.types import FINISHED_JOB_STATES

DEFAULT_BATCH_SIZE = 10_000  # readings per ingest transaction


def utc_now() -> datetime:
    return datetime.now(UTC)


# -- what callers hand in ---------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRecord:
    name: str  # Slurm's NodeName
    state: str  # Slurm's state, e.g. "idle", "mixed", "down+drain"
    powered: bool
    gpu_count: int


@dataclass(frozen=True)
class GpuRecord:
    node: str  # the node's name
    gpu_index: int  # NVML index on the node
    gpu_type: str  # a profile GPU name
    uuid: str | None = None
    clock_mhz: int | None = None  # locked SM clock; None = driver default
    power_w: float | None = None  # board power now


@dataclass(frozen=True)
class JobRecord:
    """A Slurm job as a watcher saw it. Unknown times and energy (None) never erase known ones."""

    job_id: int
    state: str
    name: str = ""
    user_name: str = ""
    account: str = ""
    partition: str = ""
    node_list: str = ""
    gres: str = ""
    submit_at: datetime | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    energy_j: float | None = None  # Slurm's ConsumedEnergy
    exit_code: int | None = None  # Slurm's ExitCode=<exit_code>:<exit_signal>, once the job ended
    exit_signal: int | None = None


@dataclass(frozen=True)
class RequestOutcome:
    """A finished or dropped request: its times, sizes and whether it met its SLOs."""

    model: str
    arrival_at: datetime
    prompt_tokens: int
    output_tokens: int
    slo_met: bool
    instance_id: int | None = None  # None: dropped before reaching an instance
    user_name: str = ""
    account: str = ""
    first_token_at: datetime | None = None
    finish_at: datetime | None = None
    ttft_s: float | None = None
    mean_tbt_s: float | None = None
    max_tbt_s: float | None = None
    external_id: str | None = None  # the gateway's request id
    api_key_id: int | None = None  # the gateway key it came with (None: none sent, or not from the gateway)
    outcome: str | None = None  # how it ended (the gateway's Outcome value; None: not said)


# -- what the store gives back ----------------------------------------------------------------


@dataclass(frozen=True)
class IngestStats:
    """What ``Store.ingest_energy`` did."""

    readings: int  # handed in
    stored: int  # new raw samples
    skipped: int  # at or before their GPU's last reading: not stored, not counted
    batches: int  # transactions committed
    energy_j: float  # energy added to the node rollups

    @classmethod
    def of(cls, results: Sequence[tuple[int, BatchResult]]) -> IngestStats:
        """From each batch's size and result."""
        return cls(sum(n for n, _ in results), sum(r.stored for _, r in results), sum(r.skipped for _, r in results),
                   len(results), sum(r.energy_j for _, r in results))


class _PlanWriter:
    """The writer thread of a pipelined ingest: writes planned batches in order, one transaction each.

    After a failure it writes nothing more (the later plans assumed the failed batch committed).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        # Two plans in flight at most: memory stays bounded whatever the stream's length.
        self._queue: queue.Queue[tuple[int, BatchPlan] | None] = queue.Queue(maxsize=2)
        self.results: list[tuple[int, BatchResult]] = []
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="festina-ingest-writer", daemon=True)
        self._thread.start()

    def put(self, readings: int, plan: BatchPlan) -> None:
        self._queue.put((readings, plan))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._failure is not None:
                continue
            readings, plan = item
            try:
                now = self._store._clock()
                with self._store._transaction("ingest_energy") as session:
                    write_plan(session.connection(), plan, now, check_cursors=True)
                self.results.append((readings, plan.result()))
            except BaseException as exc:  # noqa: BLE001 - handed to the ingesting thread, which raises it
                self._failure = exc


@dataclass(frozen=True)
class NodeState:
    id: int
    name: str
    state: str
    powered: bool
    gpu_count: int


@dataclass(frozen=True)
class GpuState:
    id: int
    node_id: int
    gpu_index: int
    gpu_type: str
    uuid: str | None
    clock_mhz: int | None
    power_w: float | None


@dataclass(frozen=True)
class InstanceState:
    id: int
    model: str
    gpus: tuple[int, ...]  # GPU ids, one per tensor-parallel rank
    node_id: int  # the node of its GPUs
    phase: InstancePhase
    sm_pct: float
    batch_cap: int
    memory_fraction: float
    endpoint_url: str | None
    slurm_job_id: int | None
    started_at: datetime
    ready_at: datetime | None


@dataclass(frozen=True)
class LiveState:
    """What festinad rebuilds its view from on restart (before it asks Slurm what changed)."""

    nodes: tuple[NodeState, ...]  # every node, by name
    gpus: tuple[GpuState, ...]  # every GPU, by node and index
    instances: tuple[InstanceState, ...]  # instances not stopped, oldest first
    jobs: tuple[JobRecord, ...]  # the Slurm jobs of those instances


@dataclass(frozen=True)
class DecisionRow:
    """An audit-trail row as read back."""

    id: int
    decided_at: datetime
    kind: str
    action: str
    model: str | None
    instance_id: int | None
    gpu_id: int | None
    node_id: int | None
    reason: str
    details: dict[str, Any]
    times_decided: int  # 1: decided once; more: decided again unchanged, counted on this row
    last_decided_at: datetime  # decided_at where decided once
    node_name: str | None  # the node of node_id, where it still exists
    gpu_index: int | None  # gpu_id's index on its node, where it still exists


def _check_instance_settings(where: str, sm_pct: Any, batch_cap: Any, memory_fraction: Any,
                             endpoint_url: Any) -> None:
    _number(where, "sm_pct", sm_pct, high=100.0, low_open=True, optional=True)
    _integer(where, "batch_cap", batch_cap, positive=True, optional=True)
    _number(where, "memory_fraction", memory_fraction, high=1.0, low_open=True, optional=True)
    _text(where, "endpoint_url", endpoint_url, max_len=1024, optional=True)


# -- decisions as rows --------------------------------------------------------------------------

# What a decision is about, and what it decided: the latest decision with the same target and the same
# payload is the same decision made again (counted on that row, not copied).
_DECISION_TARGET = ("kind", "model", "instance_id", "gpu_id", "node_id")
_DECISION_PAYLOAD = ("action", "reason", "details")

_ACTION_KINDS: dict[type, tuple[str, str]] = {
    Route: ("placement", "route"),
    Drop: ("placement", "drop"),
    StartInstance: ("scale", "start_instance"),
    StopInstance: ("scale", "stop_instance"),
    Migrate: ("migration", "migrate"),
    MoveQueued: ("migration", "move_queued"),
    PowerOff: ("power", "power_off"),
    PowerOn: ("power", "power_on"),
    GpuSettings: ("setting", "gpu_settings"),
}


def _jsonable(value: Any) -> Any:
    """Dataclass fields as JSON: tuples become lists, mapping keys (instance ids) strings."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def decision_row(action: Action | Placement | GpuSettings, reason: str, *, model: str | None = None,
                 gpu_id: int | None = None) -> dict[str, Any]:
    """The audit row of one decision (without its time): kind, action name, the ids it names, details.

    ``model`` names the requested model of a placement (a ``Route`` or ``Drop`` does not say
    which); ``gpu_id`` the GPU of ``GpuSettings``. Ids an action implies but does not name
    (the node of a GPU, an instance's model) are filled in by ``Store`` from the database.
    """
    kind, name = _ACTION_KINDS[type(action)]
    details = {f.name: _jsonable(getattr(action, f.name)) for f in dataclasses.fields(action)}
    instance_id: int | None = None
    node_id: int | None = None
    if isinstance(action, Route | StopInstance | Migrate):
        instance_id = action.instance_id
    elif isinstance(action, MoveQueued):
        instance_id = action.from_instance
    elif isinstance(action, PowerOff | PowerOn):
        node_id = action.node
    if isinstance(action, StartInstance | Migrate) and action.gpus:
        gpu_id = action.gpus[0]
    if isinstance(action, StartInstance):
        model = action.model
    return {"kind": kind, "action": name, "model": model, "instance_id": instance_id, "gpu_id": gpu_id,
            "node_id": node_id, "reason": reason, "details": details}


# -- the store ----------------------------------------------------------------------------------


class Store:
    """festina's repository over one engine; see the module docstring for its contracts."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utc_now) -> None:
        self.engine = engine
        self._clock = clock
        # Its transactions read, then write: IMMEDIATE on SQLite, so that festinad and festina-node sharing one
        # file wait for each other instead of failing with "database is locked" (db/engine.py _sqlite_on_begin).
        self._sessions = sessionmaker(writer_engine(engine), expire_on_commit=False)

    # -- plumbing

    def check_schema(self) -> None:
        """Fail unless the database is migrated to this package's head (``festina db upgrade``)."""
        # Imported here: Alembic is for commands that check or migrate the schema; the node's hooks write
        # through a Store and would otherwise load it (and log its plugin setup) on every job.
        from festina_hpc.db import migrate

        revision = migrate.current(self.engine)
        if not revision.is_head:
            raise DatabaseError(f"database {mask_url(self.engine.url)} is at revision {revision.current}, "
                                f"festina needs {revision.head}: run `festina db upgrade`")

    @contextmanager
    def _transaction(self, operation: str) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except IntegrityError as exc:
            raise DatabaseError(f"database {mask_url(self.engine.url)}: {operation} refused: "
                                f"{first_line(exc)}") from None
        except DBAPIError as exc:
            if exc.connection_invalidated or _is_connection_error(exc):
                raise unavailable(self.engine.url, exc) from None
            raise DatabaseError(f"database {mask_url(self.engine.url)}: {operation} failed: "
                                f"{first_line(exc)}") from None

    def _upsert(self, session: Session, table: Table, rows: list[dict[str, Any]], keys: Sequence[str],
                keep_known: Sequence[str] = ()) -> None:
        """INSERT ... ON CONFLICT (keys) DO UPDATE every other column, for a list of rows.

        Columns in ``keep_known`` keep their stored value where the new one is NULL.
        """
        if not rows:
            return
        # The last of several rows with one key wins: PostgreSQL refuses to update a row twice
        # in one statement, which a multi-row insert would otherwise ask of it.
        rows = list({tuple(row[k] for k in keys): row for row in rows}.values())
        dialect = session.get_bind().dialect.name
        stmt = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        updates: dict[str, Any] = {}
        for column in rows[0]:
            if column in keys:
                continue
            new = stmt.excluded[column]
            updates[column] = func.coalesce(new, table.c[column]) if column in keep_known else new
        session.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=updates), rows)

    # -- nodes, GPUs, jobs

    def upsert_nodes(self, nodes: Sequence[NodeRecord]) -> dict[str, int]:
        """Insert or update nodes by name; returns every given name's id."""
        for i, node in enumerate(nodes):
            where = f"nodes[{i}]"
            _text(where, "name", node.name, required=True)
            _text(where, "state", node.state, max_len=64)
            _integer(where, "gpu_count", node.gpu_count)
        now = self._clock()
        rows = [{"name": n.name, "state": n.state, "powered": n.powered, "gpu_count": n.gpu_count,
                 "updated_at": now} for n in nodes]
        with self._transaction("upsert_nodes") as session:
            self._upsert(session, _table(Node), rows, ["name"])
            return self._node_ids(session, [n.name for n in nodes])

    def upsert_gpus(self, gpus: Sequence[GpuRecord]) -> dict[tuple[str, int], int]:
        """Insert or update GPUs by (node name, index); returns the ids of every GPU of those nodes.

        The nodes must exist (``upsert_nodes`` first).
        """
        for i, gpu in enumerate(gpus):
            where = f"gpus[{i}]"
            _text(where, "node", gpu.node, required=True)
            _integer(where, "gpu_index", gpu.gpu_index)
            _text(where, "gpu_type", gpu.gpu_type, max_len=64, required=True)
            _text(where, "uuid", gpu.uuid, max_len=64, optional=True)
            _integer(where, "clock_mhz", gpu.clock_mhz, positive=True, optional=True)
            _number(where, "power_w", gpu.power_w, optional=True)
        now = self._clock()
        with self._transaction("upsert_gpus") as session:
            node_ids = self._node_ids(session, sorted({g.node for g in gpus}))
            for i, gpu in enumerate(gpus):
                if gpu.node not in node_ids:
                    raise InvalidRecord(f"gpus[{i}].node = {gpu.node!r} is not a known node (upsert_nodes first)")
            rows = [{"node_id": node_ids[g.node], "gpu_index": g.gpu_index, "uuid": g.uuid, "gpu_type": g.gpu_type,
                     "clock_mhz": g.clock_mhz, "power_w": g.power_w, "updated_at": now} for g in gpus]
            self._upsert(session, _table(Gpu), rows, ["node_id", "gpu_index"])
            found = session.execute(select(Node.name, Gpu.gpu_index, Gpu.id).join(Gpu.node)
                                    .where(Node.name.in_(node_ids)))
            return {(name, index): gpu_id for name, index, gpu_id in found}

    def upsert_jobs(self, jobs: Sequence[JobRecord]) -> None:
        """Insert or update Slurm jobs by job id; a None time, energy or exit code, or an empty text, keeps what
        is stored, and COMPLETING (the epilog's word) never replaces a final state festinad already wrote."""
        for i, job in enumerate(jobs):
            where = f"slurm_jobs[{i}] (job {job.job_id!r})"
            _integer(where, "job_id", job.job_id, positive=True)
            _text(where, "state", job.state, max_len=64, required=True)
            for name in _JOB_TEXTS:
                if name != "node_list":
                    _text(where, name, getattr(job, name))
            _text(where, "node_list", job.node_list, max_len=65_536)
            for name in ("submit_at", "start_at", "end_at"):
                _time(where, name, getattr(job, name), optional=True)
            _not_before(where, "end_at", job.end_at, "start_at", job.start_at)
            _number(where, "energy_j", job.energy_j, optional=True)
            _integer(where, "exit_code", job.exit_code, optional=True)
            _integer(where, "exit_signal", job.exit_signal, optional=True)
        now = self._clock()
        # The last of several rows with one id wins (PostgreSQL refuses to update a row twice in one statement).
        rows = list({job.job_id: {**_fields(job), "updated_at": now} for job in jobs}.values())
        if not rows:
            return
        table = _table(SlurmJob)
        with self._transaction("upsert_jobs") as session:
            dialect = session.get_bind().dialect.name
            stmt = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
            new = stmt.excluded
            updates: dict[str, Any] = {}
            for name in rows[0]:
                if name in _JOB_TEXTS:
                    # "" is "not known here": the node's epilog knows the user, not the job's name or account.
                    updates[name] = func.coalesce(func.nullif(new[name], ""), table.c[name])
                elif name not in ("job_id", "state", "updated_at"):
                    updates[name] = func.coalesce(new[name], table.c[name])
            # The epilog (festina-node) says COMPLETING, possibly after festinad wrote the job's final state.
            # (= ... OR, not IN: an expanding IN cannot go with a multi-row executemany.)
            finished = or_(*(table.c.state == state for state in sorted(FINISHED_JOB_STATES)))
            updates["state"] = case((and_(new.state == "COMPLETING", finished), table.c.state), else_=new.state)
            updates["updated_at"] = new.updated_at
            session.execute(stmt.on_conflict_do_update(index_elements=["job_id"], set_=updates), rows)

    def open_jobs(self) -> list[JobRecord]:
        """The jobs whose end is not recorded yet (``end_at`` NULL), for festinad's reconcile to follow."""
        with self._transaction("open_jobs") as session:
            return [_job_record(j) for j in session.scalars(select(SlurmJob).where(SlurmJob.end_at.is_(None))
                                                            .order_by(SlurmJob.job_id))]

    # -- model instances

    def create_instance(self, model: str, gpu_ids: Sequence[int], *, at: datetime, sm_pct: float = 100.0,
                        batch_cap: int = 256, memory_fraction: float = 1.0, slurm_job_id: int | None = None,
                        endpoint_url: str | None = None) -> int:
        """Record a new instance, loading, on ``gpu_ids`` (one per rank, one node); returns its id.

        A Slurm job id festina has not recorded yet (sbatch just answered) gets a PENDING job row.
        """
        where = "instance"
        _text(where, "model", model, required=True)
        _time(where, "at", at)
        _check_instance_settings(where, sm_pct, batch_cap, memory_fraction, endpoint_url)
        _integer(where, "slurm_job_id", slurm_job_id, positive=True, optional=True)
        with self._transaction("create_instance") as session:
            self._check_placement(session, where, gpu_ids)
            if slurm_job_id is not None:
                self._ensure_job(session, slurm_job_id)
            instance = ModelInstance(model=model, sm_pct=sm_pct, batch_cap=batch_cap,
                                     memory_fraction=memory_fraction, endpoint_url=endpoint_url,
                                     phase=InstancePhase.LOADING, slurm_job_id=slurm_job_id, started_at=at,
                                     updated_at=self._clock(),
                                     placement=[InstanceGpu(rank=r, gpu_id=g) for r, g in enumerate(gpu_ids)])
            session.add(instance)
            session.flush()
            return instance.id

    def create_instance_for(self, start: StartInstance, *, at: datetime, slurm_job_id: int | None = None,
                            endpoint_url: str | None = None) -> int:
        """``create_instance`` for a policy's ``StartInstance``."""
        return self.create_instance(start.model, start.gpus, at=at, sm_pct=start.sm_pct, batch_cap=start.batch_cap,
                                    memory_fraction=start.memory_fraction, slurm_job_id=slurm_job_id,
                                    endpoint_url=endpoint_url)

    def set_phase(self, instance_id: int, phase: InstancePhase, *, at: datetime) -> None:
        """Move an instance forward in its lifecycle; READY stamps ready_at, STOPPED stopped_at."""
        where = f"instance {instance_id}"
        _time(where, "at", at)
        with self._transaction("set_phase") as session:
            instance = self._instance(session, instance_id)
            if phase < instance.phase:
                raise InvalidRecord(f"{where}.phase = {phase.name.lower()!r} would go back from "
                                    f"{instance.phase.name.lower()!r}")
            instance.phase = phase
            if phase == InstancePhase.READY and instance.ready_at is None:
                instance.ready_at = at
            if phase == InstancePhase.STOPPED and instance.stopped_at is None:
                instance.stopped_at = at
            instance.updated_at = self._clock()

    def update_instance(self, instance_id: int, *, sm_pct: float | None = None, batch_cap: int | None = None,
                        memory_fraction: float | None = None, endpoint_url: str | None = None,
                        slurm_job_id: int | None = None, gpu_ids: Sequence[int] | None = None) -> None:
        """Change an instance's settings, endpoint, job or placement; None leaves a field as it is."""
        where = f"instance {instance_id}"
        _check_instance_settings(where, sm_pct, batch_cap, memory_fraction, endpoint_url)
        _integer(where, "slurm_job_id", slurm_job_id, positive=True, optional=True)
        with self._transaction("update_instance") as session:
            instance = self._instance(session, instance_id)
            for name, value in (("sm_pct", sm_pct), ("batch_cap", batch_cap), ("memory_fraction", memory_fraction),
                                ("endpoint_url", endpoint_url)):
                if value is not None:
                    setattr(instance, name, value)
            if slurm_job_id is not None:
                self._ensure_job(session, slurm_job_id)
                instance.slurm_job_id = slurm_job_id
            if gpu_ids is not None:
                self._check_placement(session, where, gpu_ids)
                instance.placement.clear()
                session.flush()  # the old ranks go before the new ones take their keys
                instance.placement.extend(InstanceGpu(rank=r, gpu_id=g) for r, g in enumerate(gpu_ids))
            instance.updated_at = self._clock()

    def instances_of_jobs(self, jobs: Mapping[int, str | None]) -> dict[int, int]:
        """The model instance each Slurm job runs (job id -> instance id); jobs with none are left out.

        ``jobs`` maps a job id to the instance label of its comment (None: none). The instance
        recorded with the job's id wins: festinad links the two when ``sbatch`` answers, and records
        an adopted job's instance with it (the latest such instance, should a job have had several).
        Otherwise a numeric label names the instance by id, but only one linked to no job yet (the
        moment between ``sbatch`` and the link): a comment naming another job's instance is not
        believed, so no job can charge its energy to someone else's instance.
        """
        for job_id in jobs:
            _integer("instances_of_jobs", "job_id", job_id, positive=True)
        if not jobs:
            return {}
        with self._transaction("instances_of_jobs") as session:
            found: dict[int, int] = {}
            for instance_id, linked_job in session.execute(
                    select(ModelInstance.id, ModelInstance.slurm_job_id)
                    .where(ModelInstance.slurm_job_id.in_(sorted(jobs))).order_by(ModelInstance.id)):
                if linked_job is not None:  # always, by the IN; the check tells the type checker
                    found[linked_job] = instance_id
            # A label of up to 18 digits fits the id column on every backend; a longer one names no instance.
            labelled = {job_id: int(label) for job_id, label in jobs.items()
                        if job_id not in found and label is not None and label.isascii() and label.isdigit()
                        and len(label) <= 18}
            if labelled:
                free = {instance_id for instance_id, linked in session.execute(
                    select(ModelInstance.id, ModelInstance.slurm_job_id)
                    .where(ModelInstance.id.in_(sorted(set(labelled.values()))))) if linked is None}
                found.update((job_id, instance_id) for job_id, instance_id in labelled.items()
                             if instance_id in free)
            return found

    def apply_gpu_settings(self, gpu_id: int, settings: GpuSettings) -> None:
        """Store settings a node controller applied: the GPU's clock, its instances' SM shares and batch caps."""
        where = f"gpu {gpu_id} settings"
        _integer(where, "clock_mhz", settings.clock_mhz, positive=True, optional=True)
        for instance_id, pct in settings.sm_pct.items():
            _number(where, f"sm_pct[{instance_id}]", pct, high=100.0, low_open=True)
        for instance_id, cap in settings.batch_cap.items():
            _integer(where, f"batch_cap[{instance_id}]", cap, positive=True)
        now = self._clock()
        with self._transaction("apply_gpu_settings") as session:
            gpu = session.get(Gpu, gpu_id)
            if gpu is None:
                raise InvalidRecord(f"{where}: gpu_id = {gpu_id!r} is not a known GPU")
            if settings.clock_mhz is not None:
                gpu.clock_mhz = settings.clock_mhz
                gpu.updated_at = now
            for instance_id in {*settings.sm_pct, *settings.batch_cap}:
                instance = self._instance(session, instance_id)
                if instance_id in settings.sm_pct:
                    instance.sm_pct = settings.sm_pct[instance_id]
                if instance_id in settings.batch_cap:
                    instance.batch_cap = settings.batch_cap[instance_id]
                instance.updated_at = now

    # -- records at request rate

    def record_requests(self, outcomes: Sequence[RequestOutcome]) -> int:
        """Append request outcomes in one multi-row insert; returns how many. A request checkpointed in flight
        (``checkpoint_requests``, same ``external_id``) leaves ``requests_in_flight`` in the same transaction."""
        for i, r in enumerate(outcomes):
            _check_request(f"requests[{i}]", r)
        if not outcomes:
            return 0
        rows = [_fields(r) for r in outcomes]
        checkpointed = [r.external_id for r in outcomes if r.external_id is not None]
        tenant_rows = _tenant_tokens(outcomes)
        with self._transaction("record_requests") as session:
            if checkpointed:
                session.execute(delete(_table(RequestInFlight))
                                .where(RequestInFlight.external_id.in_(checkpointed)))
            session.execute(insert(_table(RequestRecord)), rows)
            self._add_tenant_tokens(session, tenant_rows)
        return len(rows)

    def _add_tenant_tokens(self, session: Session, tenant_rows: list[dict[str, Any]]) -> None:
        # In the caller's transaction: the tenant split never counts a request the table lacks.
        if not tenant_rows:
            return
        table = _table(TenantTokensHourly)
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(table)
        session.execute(stmt.on_conflict_do_update(
            index_elements=["instance_id", "account", "user_name", "hour_at"],
            set_={"tokens": table.c.tokens + stmt.excluded.tokens,
                  "requests": table.c.requests + stmt.excluded.requests}), tenant_rows)

    def checkpoint_requests(self, outcomes: Sequence[RequestOutcome]) -> int:
        """Store requests still in flight (each with its ``external_id``), replacing their last checkpoint.

        Nothing is charged yet: the final row (``record_requests``) or, after a crash,
        ``close_requests_in_flight`` charges the tokens once."""
        for i, r in enumerate(outcomes):
            where = f"requests_in_flight[{i}]"
            _check_request(where, r)
            _text(where, "external_id", r.external_id, max_len=128, required=True)
        if not outcomes:
            return 0
        columns = {c.name for c in _table(RequestInFlight).columns}
        rows = [{k: v for k, v in _fields(r).items() if k in columns} for r in outcomes]
        with self._transaction("checkpoint_requests") as session:
            self._upsert(session, _table(RequestInFlight), rows, ["external_id"])
        return len(rows)

    def close_requests_in_flight(self, outcome: str = "gateway_crashed") -> int:
        """Move every checkpoint left in ``requests_in_flight`` to ``requests`` with ``outcome``, charging the
        tokens of its last checkpoint; returns how many. festinad calls it when it starts: a row still
        there was cut by the previous festinad's crash."""
        with self._transaction("close_requests_in_flight") as session:
            left = session.scalars(select(RequestInFlight).order_by(RequestInFlight.arrival_at)).all()
            if not left:
                return 0
            closed = [RequestOutcome(
                model=row.model, arrival_at=row.arrival_at, prompt_tokens=row.prompt_tokens,
                output_tokens=row.output_tokens, slo_met=False, instance_id=row.instance_id,
                user_name=row.user_name, account=row.account, first_token_at=row.first_token_at,
                finish_at=row.finish_at, ttft_s=row.ttft_s, mean_tbt_s=row.mean_tbt_s, max_tbt_s=row.max_tbt_s,
                external_id=row.external_id, api_key_id=row.api_key_id, outcome=outcome) for row in left]
            session.execute(delete(_table(RequestInFlight)))
            session.execute(insert(_table(RequestRecord)), [_fields(r) for r in closed])
            self._add_tenant_tokens(session, _tenant_tokens(closed))
        return len(closed)

    def record_energy(self, readings: Sequence[EnergyReading]) -> int:
        """Append GPU energy readings (and their instance shares) as one batch; returns how many were given.

        The samples and the rollups they add to (see ``festina_hpc.db.ingest``) are written in one
        transaction. Re-recording a reading already stored (same GPU, same time, or older than its
        GPU's last reading) is a no-op.
        """
        self.write_energy_batch(readings)
        return len(readings)

    def write_energy_batch(self, readings: Sequence[EnergyReading]) -> BatchResult:
        """``record_energy``, returning what the batch stored, skipped and added up."""
        validate_readings(readings)
        if not readings:
            return BatchResult(0, 0, 0.0)
        now = self._clock()
        with self._transaction("record_energy") as session:
            return write_readings(session.connection(), readings, now)

    def ingest_energy(self, readings: Iterable[EnergyReading], *, batch_size: int = DEFAULT_BATCH_SIZE,
                      pipeline: bool | None = None) -> IngestStats:
        """Stream readings in batches of ``batch_size``, each batch (samples and rollups) its own transaction.

        A failure stops the ingest with the batches before it committed and the failing one not at
        all. With ``pipeline`` a writer thread writes batch k while this thread validates and plans
        batch k+1 (the database's work and Python's overlap); each planned batch is written in order,
        after checking that no other writer moved its GPUs' cursors meanwhile. GPUs, instances and
        cursors are looked up once per call, so an instance's job assigned during the call is
        counted from the next call on.

        ``pipeline`` None (the default): on PostgreSQL only. SQLite's work runs in this process, so
        there a writer thread mostly contends with the planning for the GIL (measured: 30 % slower).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidRecord(f"batch_size = {batch_size!r} must be a positive integer")
        if pipeline is None:
            pipeline = self.engine.dialect.name == "postgresql"
        if not pipeline:
            results: list[tuple[int, BatchResult]] = []
            for batch in _chunks(readings, batch_size):
                results.append((len(batch), self.write_energy_batch(batch)))
            return IngestStats.of(results)
        writer = _PlanWriter(self)
        node_of: dict[int, int] = {}
        instances: dict[int, InstanceInfo] = {}
        cursors: dict[int, Cursor] = {}
        looked_up: set[int] = set()
        try:
            for batch in _chunks(readings, batch_size):
                writer.raise_failure()
                validate_readings(batch)
                with self._transaction("ingest_energy") as session:
                    connection = session.connection()
                    node_of, instances = lookup(connection, batch, known_gpus=node_of, known_instances=instances)
                    new = {r.gpu_id for r in batch} - looked_up
                    if new:
                        cursors.update(read_cursors(connection, list(new)))
                        looked_up |= new
                plan = plan_batch(batch, node_of, instances, cursors)
                cursors.update(plan.cursors_after)
                writer.put(len(batch), plan)
        except BaseException:
            writer.close()
            writer.raise_failure()  # an earlier batch's failure is the first one
            raise
        writer.close()
        writer.raise_failure()
        return IngestStats.of(writer.results)

    def set_job_energy(self, job_id: int, energy_j: float, *, from_at: datetime, to_at: datetime) -> None:
        """Store festina's measured energy total of a Slurm job over [from_at, to_at]."""
        self._set_total(_table(JobEnergy), "job_id", job_id, energy_j, from_at, to_at)

    def set_instance_energy(self, instance_id: int, energy_j: float, *, from_at: datetime, to_at: datetime) -> None:
        """Store festina's measured energy total of a model instance over [from_at, to_at]."""
        self._set_total(_table(InstanceEnergy), "instance_id", instance_id,
                        energy_j, from_at, to_at)

    def _set_total(self, table: Table, key: str, key_value: int, energy_j: float, from_at: datetime,
                   to_at: datetime) -> None:
        where = f"{table.name} ({key} {key_value!r})"
        _integer(where, key, key_value)
        _number(where, "energy_j", energy_j)
        _time(where, "from_at", from_at)
        _time(where, "to_at", to_at)
        _not_before(where, "to_at", to_at, "from_at", from_at)
        row = {key: key_value, "energy_j": energy_j, "from_at": from_at, "to_at": to_at, "updated_at": self._clock()}
        with self._transaction(f"set {table.name}") as session:
            self._upsert(session, table, [row], [key])

    # -- decisions

    def record_plan(self, plan: Plan, *, at: datetime) -> list[int]:
        """One decision row per action of a plan, each with the plan's reason; returns their ids."""
        return self._record_decisions([decision_row(action, plan.reason) for action in plan.actions], at)

    def record_placement(self, model: str, placement: Placement, *, at: datetime, reason: str = "") -> int:
        """The decision for one request of ``model`` (a drop's reason is its own)."""
        if isinstance(placement, Drop) and not reason:
            reason = placement.reason
        return self._record_decisions([decision_row(placement, reason, model=model)], at)[0]

    def record_settings(self, gpu_id: int, settings: GpuSettings, *, at: datetime, reason: str = "") -> int:
        """The local controller's decision for one GPU."""
        return self._record_decisions([decision_row(settings, reason, gpu_id=gpu_id)], at)[0]

    def _record_decisions(self, rows: list[dict[str, Any]], at: datetime) -> list[int]:
        """Each row as a new decision, or counted on the latest decision for its target where that one is the
        same (action, reason and details): a policy re-deciding the same thing every period adds no rows."""
        _time("decision", "at", at)
        if not rows:
            return []
        with self._transaction("record_decisions") as session:
            self._fill_in_ids(session, rows)
            ids: list[int] = []
            for row in rows:
                latest = session.scalars(
                    select(Decision).where(*(getattr(Decision, key) == row[key] for key in _DECISION_TARGET))
                    .order_by(Decision.id.desc()).limit(1)).first()
                if latest is not None and all(getattr(latest, key) == row[key] for key in _DECISION_PAYLOAD):
                    # In SQL, so that festinad and a node counting the same row at once both count.
                    session.execute(update(Decision).where(Decision.id == latest.id).values(
                        times_decided=Decision.times_decided + 1,
                        last_decided_at=max(at, latest.last_decided_at)))
                    ids.append(latest.id)
                    continue
                decision = Decision(decided_at=at, last_decided_at=at, times_decided=1, **row)
                session.add(decision)
                session.flush()
                ids.append(decision.id)
            return ids

    def _fill_in_ids(self, session: Session, rows: list[dict[str, Any]]) -> None:
        """Add what an action implies but does not name: an instance's model and GPU, a GPU's node."""
        instance_ids = {row["instance_id"] for row in rows if row["instance_id"] is not None}
        instances: dict[int, tuple[str, int | None]] = {}
        if instance_ids:
            found = session.execute(select(ModelInstance.id, ModelInstance.model, InstanceGpu.gpu_id)
                                    .outerjoin(InstanceGpu, (InstanceGpu.instance_id == ModelInstance.id)
                                               & (InstanceGpu.rank == 0))
                                    .where(ModelInstance.id.in_(instance_ids)))
            instances = {instance_id: (model, gpu_id) for instance_id, model, gpu_id in found}
        for row in rows:
            if row["instance_id"] in instances:
                model, gpu_id = instances[row["instance_id"]]
                row["model"] = row["model"] or model
                if row["gpu_id"] is None:
                    row["gpu_id"] = gpu_id
        gpu_ids = {row["gpu_id"] for row in rows if row["gpu_id"] is not None and row["node_id"] is None}
        if gpu_ids:
            nodes = {gpu_id: node_id for gpu_id, node_id in
                     session.execute(select(Gpu.id, Gpu.node_id).where(Gpu.id.in_(gpu_ids)))}
            for row in rows:
                if row["node_id"] is None and row["gpu_id"] in nodes:
                    row["node_id"] = nodes[row["gpu_id"]]

    def decisions(self, *, since: datetime, kind: str | None = None, limit: int = 1000) -> list[DecisionRow]:
        """Decisions made (first or again) at or after ``since``, oldest first, with their node's name and
        their GPU's index where those rows still exist."""
        _time("decisions", "since", since)
        query = (select(Decision, Node.name, Gpu.gpu_index)
                 .outerjoin(Node, Node.id == Decision.node_id).outerjoin(Gpu, Gpu.id == Decision.gpu_id)
                 .where(Decision.last_decided_at >= since).order_by(Decision.decided_at, Decision.id))
        if kind is not None:
            query = query.where(Decision.kind == kind)
        with self._transaction("decisions") as session:
            return [DecisionRow(d.id, d.decided_at, d.kind, d.action, d.model, d.instance_id, d.gpu_id, d.node_id,
                                d.reason, d.details, d.times_decided, d.last_decided_at, node_name, gpu_index)
                    for d, node_name, gpu_index in session.execute(query.limit(limit))]

    # -- restart

    def load_live_state(self) -> LiveState:
        """Every node and GPU, the instances not stopped (oldest first) and their Slurm jobs."""
        with self._transaction("load_live_state") as session:
            nodes = tuple(NodeState(n.id, n.name, n.state, n.powered, n.gpu_count)
                          for n in session.scalars(select(Node).order_by(Node.name)))
            gpu_rows = session.scalars(select(Gpu).join(Gpu.node).order_by(Node.name, Gpu.gpu_index)).all()
            gpus = tuple(GpuState(g.id, g.node_id, g.gpu_index, g.gpu_type, g.uuid, g.clock_mhz, g.power_w)
                         for g in gpu_rows)
            node_of = {g.id: g.node_id for g in gpus}
            live = session.scalars(select(ModelInstance).options(selectinload(ModelInstance.placement),
                                                                 selectinload(ModelInstance.job))
                                   .where(ModelInstance.phase != InstancePhase.STOPPED)
                                   .order_by(ModelInstance.started_at, ModelInstance.id)).all()
            instances = tuple(
                InstanceState(i.id, i.model, tuple(p.gpu_id for p in i.placement),
                              node_of[i.placement[0].gpu_id], i.phase, i.sm_pct, i.batch_cap, i.memory_fraction,
                              i.endpoint_url, i.slurm_job_id, i.started_at, i.ready_at)
                for i in live)
            jobs = tuple(_job_record(i.job) for i in live if i.job is not None)
            return LiveState(nodes, gpus, instances, jobs)

    # -- helpers inside a transaction

    @staticmethod
    def _node_ids(session: Session, names: Sequence[str]) -> dict[str, int]:
        if not names:
            return {}
        return {name: node_id for name, node_id in session.execute(
            select(Node.name, Node.id).where(Node.name.in_(names)))}

    @staticmethod
    def _instance(session: Session, instance_id: int) -> ModelInstance:
        instance = session.get(ModelInstance, instance_id)
        if instance is None:
            raise InvalidRecord(f"instance_id = {instance_id!r} is not a known instance")
        return instance

    @staticmethod
    def _check_placement(session: Session, where: str, gpu_ids: Sequence[int]) -> None:
        if not gpu_ids:
            raise InvalidRecord(f"{where}.gpu_ids = {list(gpu_ids)!r} must name at least one GPU")
        if len(set(gpu_ids)) != len(gpu_ids):
            raise InvalidRecord(f"{where}.gpu_ids = {list(gpu_ids)!r} names a GPU twice")
        nodes = {gpu_id: node_id for gpu_id, node_id in
                     session.execute(select(Gpu.id, Gpu.node_id).where(Gpu.id.in_(gpu_ids)))}
        unknown = [g for g in gpu_ids if g not in nodes]
        if unknown:
            raise InvalidRecord(f"{where}.gpu_ids = {list(gpu_ids)!r}: {unknown} not known GPUs")
        if len(set(nodes.values())) > 1:
            raise InvalidRecord(f"{where}.gpu_ids = {list(gpu_ids)!r} span several nodes")

    def _ensure_job(self, session: Session, job_id: int) -> None:
        if session.get(SlurmJob, job_id) is None:
            session.add(SlurmJob(job_id=job_id, state="PENDING", updated_at=self._clock()))
            session.flush()


def _chunks(items: Iterable[EnergyReading], size: int) -> Iterator[list[EnergyReading]]:
    batch: list[EnergyReading] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


def _check_request(where: str, r: RequestOutcome) -> None:
    """A request row's fields, each refused with one line naming it."""
    if r.external_id:
        where += f" ({r.external_id})"
    _text(where, "model", r.model, required=True)
    _text(where, "user_name", r.user_name)
    _text(where, "account", r.account)
    _text(where, "external_id", r.external_id, max_len=128, optional=True)
    _text(where, "outcome", r.outcome, max_len=32, optional=True)
    _integer(where, "instance_id", r.instance_id, optional=True)
    _integer(where, "api_key_id", r.api_key_id, optional=True)
    _integer(where, "prompt_tokens", r.prompt_tokens)
    _integer(where, "output_tokens", r.output_tokens)
    if not isinstance(r.slo_met, bool):
        raise InvalidRecord(f"{where}.slo_met = {r.slo_met!r} is not true or false")
    _time(where, "arrival_at", r.arrival_at)
    _time(where, "first_token_at", r.first_token_at, optional=True)
    _time(where, "finish_at", r.finish_at, optional=True)
    _not_before(where, "first_token_at", r.first_token_at, "arrival_at", r.arrival_at)
    _not_before(where, "finish_at", r.finish_at, "first_token_at", r.first_token_at or r.arrival_at)
    for name in ("ttft_s", "mean_tbt_s", "max_tbt_s"):
        _number(where, name, getattr(r, name), optional=True)


def _tenant_tokens(outcomes: Sequence[RequestOutcome]) -> list[dict[str, Any]]:
    """Rows for ``tenant_tokens_hourly``: tokens and requests per (instance, account, user, hour of arrival).

    Prompt and output tokens count alike: the share of an instance's energy a request is charged
    is its share of the tokens the instance processed in that hour (prefill and decode both burn it).
    Requests that reached no instance used no instance energy and are left out.
    """
    sums: dict[tuple[int, str, str, int], list[int]] = {}
    for r in outcomes:
        if r.instance_id is None:
            continue
        key = (r.instance_id, r.account, r.user_name, int(r.arrival_at.timestamp() // HOUR_S))
        total = sums.setdefault(key, [0, 0])
        total[0] += r.prompt_tokens + r.output_tokens
        total[1] += 1
    return [{"instance_id": instance, "account": account, "user_name": user,
             "hour_at": datetime.fromtimestamp(hour * HOUR_S, UTC), "tokens": tokens, "requests": requests}
            for (instance, account, user, hour), (tokens, requests) in sums.items()]


# slurm_jobs' text columns that an empty value leaves as they are (upsert_jobs).
_JOB_TEXTS = ("name", "user_name", "account", "partition", "gres", "node_list")


def _fields(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _job_record(job: SlurmJob) -> JobRecord:
    return JobRecord(job.job_id, job.state, job.name, job.user_name, job.account, job.partition, job.node_list,
                     job.gres, job.submit_at, job.start_at, job.end_at, job.energy_j, job.exit_code, job.exit_signal)


def _is_connection_error(exc: DBAPIError) -> bool:
    """Whether the driver says it could not reach the database (as opposed to refusing a statement)."""
    message = str(exc.orig).lower()
    return isinstance(exc, OperationalError) and any(
        hint in message for hint in ("connect", "could not", "unable to open", "server closed", "timeout"))


__all__ = ["DecisionRow", "EnergyReading", "GpuRecord", "GpuState", "IngestStats", "InstanceState", "JobRecord",
           "LiveState",
           "NodeRecord", "NodeState", "RequestOutcome", "Store", "decision_row", "utc_now"]
