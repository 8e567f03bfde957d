"""Energy ingest: GPU readings stored in batches, each batch with its rollup updates in one transaction.

A reading is a GPU's cumulative NVML energy counter at one time (with its power and, optionally,
the shares of its instances). Energy is the difference between consecutive readings of one GPU:
``write_readings`` keeps each GPU's last reading in ``energy_cursors``, differences every new
reading against the one before it, and adds the difference to the rollups in the bucket of the
reading that closes it:

- ``job_energy`` / ``instance_energy``: the share of each instance, to it and to its Slurm job;
- ``model_energy_hourly``: the instances' shares, per model per UTC hour;
- ``instance_energy_hourly``: each instance's share per UTC hour (what the account, user and tenant
  reports split over the requests the instance served in that hour);
- ``account_energy_daily``: the instances' shares, per Slurm account and user (of the instance's
  job; "" when it has none) per UTC day (``energy_by_account_day``);
- ``node_energy_hourly``: the whole difference, per node per hour, and the part no share claimed
  (``idle_energy_j``: a GPU without instances, or the unclaimed rest of its shares).

Because the samples, their shares, the rollups and the cursors of a batch are written in one
transaction, a crash mid-ingest loses no committed batch and leaves no half-counted one. Rules:

- a reading at or before its GPU's cursor (a re-read after a restart, or a late one) is skipped:
  not stored and not counted, so re-recording is a no-op and no energy is counted twice;
- a GPU's first reading only sets its cursor (there is nothing to difference it against);
- a counter lower than the one before means the driver restarted it: the difference is the new
  reading itself (energy since the restart);
- readings of one GPU are written by one writer at a time (its node's sampler); on PostgreSQL
  the cursor rows are locked for the transaction, so a second writer waits rather than double-counts.

The work is split so that it can be pipelined (``Store.ingest_energy``): ``validate_readings``
and ``plan_batch`` (pure: the differences and the rollup sums) need no transaction, ``write_plan``
writes a planned batch inside one, after re-checking under lock that the cursors it was planned
from are still the stored ones. PostgreSQL gets the raw samples through binary ``COPY`` (the
cursor guarantees they are new), SQLite through one ``executemany``; the rollups are one upsert
per rollup table per batch whatever its size (on PostgreSQL one ``unnest`` of column arrays, one
round trip). Planning sums a GPU's consecutive differences under one set of shares within an hour
before splitting them, so its per-reading work is a subtraction and a few comparisons.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Table, case, select
from sqlalchemy.dialects import postgresql, sqlite

from festina_hpc.db.errors import DatabaseError, InvalidRecord
from festina_hpc.db.models import (
    AccountEnergyDaily,
    Base,
    EnergyCursor,
    Gpu,
    InstanceEnergy,
    InstanceEnergyHourly,
    JobEnergy,
    ModelEnergyHourly,
    ModelInstance,
    NodeEnergyHourly,
    SlurmJob,
)
from festina_hpc.db.validation import check_integer, check_number, check_time

if TYPE_CHECKING:
    import psycopg

HOUR_S = 3600
DAY_S = 86_400


@dataclass(frozen=True)
class EnergyReading:
    """A GPU's energy counter and power at one time; ``shares`` splits it over its instances."""

    gpu_id: int
    sampled_at: datetime
    energy_counter_j: float
    power_w: float | None = None
    shares: Mapping[int, float] = field(default_factory=dict)  # instance id -> fraction of the energy


@dataclass(frozen=True)
class BatchResult:
    """What one batch did."""

    stored: int  # new raw samples
    skipped: int  # readings at or before their GPU's cursor: not stored, not counted
    energy_j: float  # energy differences added to the node rollups (attributed and idle)


# An instance as the rollups need it: model, Slurm job id (or None), account, user.
InstanceInfo = tuple[str, int | None, str, str]
# A GPU's last reading: its time and counter.
Cursor = tuple[datetime, float]


def _fast_ok(reading: EnergyReading, checked_shares: object) -> bool:
    """The common case checked in a few comparisons; anything else goes through the checks that name the field.

    ``checked_shares``: a shares mapping that already passed; a sampler hands the same one to many
    readings, so it is checked once, not once per reading.
    """
    power_w = reading.power_w
    counter = reading.energy_counter_j
    at = reading.sampled_at
    if not (type(reading.gpu_id) is int and type(counter) is float and 0.0 <= counter < math.inf
            and (power_w is None or (type(power_w) is float and 0.0 <= power_w < math.inf))
            and type(at) is datetime and at.tzinfo is not None):
        return False
    shares = reading.shares
    if shares and shares is not checked_shares:
        total = 0.0
        for instance_id, share in shares.items():
            if not (type(instance_id) is int and type(share) is float and 0.0 <= share <= 1.0):
                return False
            total += share
        return total <= 1.0 + 1e-9
    return True


def validate_readings(readings: Sequence[EnergyReading]) -> None:
    """Refuse a bad reading before anything is written, naming the reading, field and value."""
    checked_shares: object = None
    for i, reading in enumerate(readings):
        if _fast_ok(reading, checked_shares):
            checked_shares = reading.shares
            continue
        where = f"energy_samples[{i}] (gpu {reading.gpu_id})"
        check_integer(where, "gpu_id", reading.gpu_id)
        check_time(where, "sampled_at", reading.sampled_at)
        check_number(where, "energy_counter_j", reading.energy_counter_j)
        check_number(where, "power_w", reading.power_w, optional=True)
        if reading.shares:
            for instance_id, share in reading.shares.items():
                check_integer(where, "shares key", instance_id)
                check_number(where, f"shares[{instance_id}]", share, high=1.0)
            if sum(reading.shares.values()) > 1.0 + 1e-9:
                raise InvalidRecord(f"{where}.shares = {dict(reading.shares)!r} sum to more than 1")


@dataclass
class BatchPlan:
    """What one batch will write: computed from the readings and the cursors, before any write."""

    stored: list[EnergyReading]  # the new readings, by GPU and time
    skipped: int
    cursors_before: dict[int, Cursor | None]  # the cursor each GPU of the batch was planned from
    cursors_after: dict[int, Cursor]
    energy_j: float = 0.0
    node_hour: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (node, hour) -> [energy, idle]
    model_hour: dict[tuple[str, int], float] = field(default_factory=dict)
    instance_hour: dict[tuple[int, int], float] = field(default_factory=dict)
    account_day: dict[tuple[str, str, int], float] = field(default_factory=dict)
    instances: dict[int, list[Any]] = field(default_factory=dict)  # id -> [energy_j, from_at, to_at]
    jobs: dict[int, list[Any]] = field(default_factory=dict)

    def result(self) -> BatchResult:
        return BatchResult(len(self.stored), self.skipped, self.energy_j)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HOUR = timedelta(hours=1)
_sampled_at = attrgetter("sampled_at")


def plan_batch(readings: Sequence[EnergyReading], node_of: Mapping[int, int], instances: Mapping[int, InstanceInfo],
               cursors: Mapping[int, Cursor]) -> BatchPlan:
    """Difference validated readings against their GPUs' cursors and sum them into rollup buckets (pure).

    Each GPU's readings are differenced in time order, whatever order they came in. Consecutive
    differences of one GPU in one hour with the same shares form a run, and a run is split over
    its shares once: ``share * sum(differences)`` rather than a sum of ``share * difference``
    per reading (equal up to float rounding), which keeps the per-reading work to a subtraction.
    """
    by_gpu: dict[int, list[EnergyReading]] = {}
    for reading in readings:
        same_gpu = by_gpu.get(reading.gpu_id)
        if same_gpu is None:
            by_gpu[reading.gpu_id] = [reading]
        else:
            same_gpu.append(reading)
    plan = BatchPlan([], 0, {gpu: cursors.get(gpu) for gpu in by_gpu}, {})
    stored = plan.stored
    skipped = 0
    for gpu in sorted(by_gpu):
        gpu_readings = by_gpu[gpu]
        gpu_readings.sort(key=_sampled_at)  # stable: of two readings at one time the first is kept
        cursor = cursors.get(gpu)
        start = 0
        if cursor is None:  # the GPU's first reading only sets its cursor
            first = gpu_readings[0]
            stored.append(first)
            cursor = (first.sampled_at, first.energy_counter_j)
            start = 1
        previous_at, previous_counter = cursor
        run = _Run(plan, node_of[gpu], instances)
        for reading in gpu_readings[start:] if start else gpu_readings:
            at = reading.sampled_at
            if at <= previous_at:
                skipped += 1
                continue
            stored.append(reading)
            counter = reading.energy_counter_j
            shares = reading.shares
            if at >= run.hour_end or (shares is not run.shares and shares != run.shares):
                run.flush()
                run.start(at, previous_at, shares)
            run.energy_j += counter - previous_counter if counter >= previous_counter else counter
            run.to_at = at
            previous_at, previous_counter = at, counter
        run.flush()
        plan.cursors_after[gpu] = (previous_at, previous_counter)
    plan.skipped = skipped
    return plan


class _Run:
    """Differences of one GPU in one hour under one set of shares, summed before they are split."""

    __slots__ = ("energy_j", "from_at", "hour", "hour_end", "instances", "node", "plan", "shares", "to_at")

    def __init__(self, plan: BatchPlan, node: int, instances: Mapping[int, InstanceInfo]) -> None:
        self.plan = plan
        self.node = node
        self.instances = instances
        self.hour = 0
        self.hour_end = _EPOCH  # before any reading: the first one starts a run
        self.shares: Mapping[int, float] | None = None
        self.energy_j = 0.0
        self.from_at = self.to_at = _EPOCH

    def start(self, at: datetime, previous_at: datetime, shares: Mapping[int, float]) -> None:
        # Exact integer arithmetic on the timedelta: a reading a microsecond before the hour stays in it.
        self.hour = (at - _EPOCH) // _HOUR
        self.hour_end = _EPOCH + (self.hour + 1) * _HOUR
        self.shares = shares
        self.energy_j = 0.0
        self.from_at = previous_at

    def flush(self) -> None:
        if self.shares is None:
            return
        plan, energy_j, hour = self.plan, self.energy_j, self.hour
        plan.energy_j += energy_j
        claimed = 0.0
        for instance_id, share in self.shares.items():
            part_j = energy_j * share
            claimed += share
            model, job_id, account, user = self.instances[instance_id]
            key = (model, hour)
            plan.model_hour[key] = plan.model_hour.get(key, 0.0) + part_j
            instance_key = (instance_id, hour)
            plan.instance_hour[instance_key] = plan.instance_hour.get(instance_key, 0.0) + part_j
            day_key = (account, user, hour // 24)
            plan.account_day[day_key] = plan.account_day.get(day_key, 0.0) + part_j
            _add_total(plan.instances, instance_id, part_j, self.from_at, self.to_at)
            if job_id is not None:
                _add_total(plan.jobs, job_id, part_j, self.from_at, self.to_at)
        totals = plan.node_hour.get((self.node, hour))
        if totals is None:
            totals = plan.node_hour[(self.node, hour)] = [0.0, 0.0]
        totals[0] += energy_j
        # max(): shares summing to 1 up to rounding leave no negative idle energy.
        totals[1] += energy_j * max(0.0, 1.0 - claimed)
        self.shares = None


def lookup(connection: Connection, readings: Sequence[EnergyReading], *, known_gpus: Mapping[int, int] | None = None,
           known_instances: Mapping[int, InstanceInfo] | None = None) -> tuple[dict[int, int], dict[int, InstanceInfo]]:
    """The node of each GPU and the details of each instance the readings name; unknown ones are refused."""
    known_gpus = known_gpus or {}
    known_instances = known_instances or {}
    node_of = dict(known_gpus)
    missing_gpus = sorted({r.gpu_id for r in readings} - set(node_of))
    if missing_gpus:
        node_of.update((gpu, node) for gpu, node in
                       connection.execute(select(Gpu.id, Gpu.node_id).where(Gpu.id.in_(missing_gpus))))
    for i, reading in enumerate(readings):
        if reading.gpu_id not in node_of:
            raise InvalidRecord(f"energy_samples[{i}] (gpu {reading.gpu_id}).gpu_id = {reading.gpu_id!r} "
                                "is not a known GPU")
    instances = dict(known_instances)
    missing = sorted({instance_id for r in readings for instance_id in r.shares} - set(instances))
    if missing:
        found = connection.execute(
            select(ModelInstance.id, ModelInstance.model, ModelInstance.slurm_job_id, SlurmJob.account,
                   SlurmJob.user_name)
            .outerjoin(SlurmJob, SlurmJob.job_id == ModelInstance.slurm_job_id)
            .where(ModelInstance.id.in_(missing)))
        instances.update((row.id, (row.model, row.slurm_job_id, row.account or "", row.user_name or ""))
                         for row in found)
        for i, reading in enumerate(readings):
            for instance_id in reading.shares:
                if instance_id not in instances:
                    raise InvalidRecord(f"energy_samples[{i}] (gpu {reading.gpu_id}).shares key = {instance_id!r} "
                                        "is not a known instance")
    return node_of, instances


def read_cursors(connection: Connection, gpu_ids: Sequence[int], *, lock: bool = False) -> dict[int, Cursor]:
    """The GPUs' cursors; ``lock`` (PostgreSQL) holds them for the transaction so a second writer waits."""
    query = select(EnergyCursor.gpu_id, EnergyCursor.sampled_at, EnergyCursor.energy_counter_j).where(
        EnergyCursor.gpu_id.in_(sorted(gpu_ids)))
    if lock and connection.dialect.name == "postgresql":
        query = query.with_for_update()
    return {gpu: (at, counter) for gpu, at, counter in connection.execute(query)}


def write_readings(connection: Connection, readings: Sequence[EnergyReading], now: datetime) -> BatchResult:
    """Store validated ``readings`` and update the rollups, inside the caller's transaction.

    The caller owns the transaction (``Store.record_energy``): on any error it rolls back the
    samples and the rollups together.
    """
    if not readings:
        return BatchResult(0, 0, 0.0)
    node_of, instances = lookup(connection, readings)
    cursors = read_cursors(connection, list({r.gpu_id for r in readings}), lock=True)
    plan = plan_batch(readings, node_of, instances, cursors)
    write_plan(connection, plan, now)
    return plan.result()


def write_plan(connection: Connection, plan: BatchPlan, now: datetime, *, check_cursors: bool = False) -> None:
    """Write a planned batch: samples, shares, rollups, cursors (inside the caller's transaction).

    ``check_cursors``: the plan was made outside this transaction (pipelined ingest), so lock the
    cursors and refuse the batch if another writer moved one since.
    """
    if check_cursors:
        current = read_cursors(connection, list(plan.cursors_before), lock=True)
        for gpu, assumed in plan.cursors_before.items():
            if current.get(gpu) != assumed:
                raise DatabaseError(f"energy_cursors: gpu {gpu} was ingested by another writer at the same time "
                                    f"(expected its last reading at {assumed[0].isoformat() if assumed else None}, "
                                    f"found {current[gpu][0].isoformat() if gpu in current else None})")
    _insert_samples(connection, plan.stored)
    _write_rollups(connection, plan, now)


def _add_total(totals: dict[int, list[Any]], key: int, energy_j: float, from_at: datetime, to_at: datetime) -> None:
    total = totals.get(key)
    if total is None:
        totals[key] = [energy_j, from_at, to_at]
        return
    total[0] += energy_j
    if from_at < total[1]:
        total[1] = from_at
    if to_at > total[2]:
        total[2] = to_at


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


def _bucket(bucket: int, seconds: int) -> datetime:
    return datetime.fromtimestamp(bucket * seconds, UTC)


def _insert_samples(connection: Connection, stored: Sequence[EnergyReading]) -> None:
    if not stored:
        return
    if connection.dialect.name == "postgresql":
        # Binary COPY: the fastest way into PostgreSQL, and safe without ON CONFLICT because every
        # stored reading is newer than its GPU's cursor (locked by the caller).
        raw = cast("psycopg.Connection[Any]", connection.connection.dbapi_connection)
        with raw.cursor() as cursor:
            with cursor.copy("COPY energy_samples (gpu_id, sampled_at, energy_counter_j, power_w) "
                             "FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(_binary_samples(stored))
            if any(r.shares for r in stored):
                with cursor.copy("COPY energy_sample_shares (gpu_id, sampled_at, instance_id, share_frac) "
                                 "FROM STDIN (FORMAT BINARY)") as copy:
                    copy.write(_binary_shares(stored))
        return
    # SQLite: one executemany each, the times in the text form UtcDateTime stores (UTC wall time,
    # microseconds always written: what SQLAlchemy's SQLite DATETIME writes), formatted once per sample.
    samples: list[tuple[int, str, float, float | None]] = []
    shares: list[tuple[int, str, int, float]] = []
    for r in stored:
        at = r.sampled_at
        if at.tzinfo is not UTC:
            at = at.astimezone(UTC)
        text = at.replace(tzinfo=None).isoformat(" ", "microseconds")
        samples.append((r.gpu_id, text, r.energy_counter_j, r.power_w))
        if r.shares:
            shares.extend((r.gpu_id, text, instance_id, share) for instance_id, share in r.shares.items())
    connection.exec_driver_sql(
        "INSERT INTO energy_samples (gpu_id, sampled_at, energy_counter_j, power_w) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING", samples)
    if shares:
        connection.exec_driver_sql(
            "INSERT INTO energy_sample_shares (gpu_id, sampled_at, instance_id, share_frac) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING", shares)


# PostgreSQL's binary COPY format, packed here in one struct call per row: psycopg's write_row
# costs several times more per row, in the thread that also holds the GIL for the next batch.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" * 2
_COPY_TRAILER = b"\xff\xff"
# Each row: field count; then per field its byte length and value (length -1: NULL).
_SAMPLE_ROW = struct.Struct(">hiiiqidid")  # gpu_id int4, sampled_at timestamptz, counter float8, power float8
_SAMPLE_ROW_NO_POWER = struct.Struct(">hiiiqidi")
_SHARE_ROW = struct.Struct(">hiiiqiiid")  # gpu_id int4, sampled_at timestamptz, instance_id int4, share float8


# A timestamptz as PostgreSQL stores it: microseconds since 2000-01-01 UTC, as (at - _PG_EPOCH) //
# _MICROSECOND (exact integer arithmetic on the timedelta, one C operation).
_MICROSECOND = timedelta(microseconds=1)


def _binary_samples(stored: Sequence[EnergyReading]) -> bytes:
    with_power, no_power = _SAMPLE_ROW.pack, _SAMPLE_ROW_NO_POWER.pack
    epoch, microsecond = _PG_EPOCH, _MICROSECOND
    rows = [_COPY_SIGNATURE]
    append = rows.append
    for r in stored:
        at = (r.sampled_at - epoch) // microsecond
        if r.power_w is None:
            append(no_power(4, 4, r.gpu_id, 8, at, 8, r.energy_counter_j, -1))
        else:
            append(with_power(4, 4, r.gpu_id, 8, at, 8, r.energy_counter_j, 8, r.power_w))
    append(_COPY_TRAILER)
    return b"".join(rows)


def _binary_shares(stored: Sequence[EnergyReading]) -> bytes:
    pack = _SHARE_ROW.pack
    epoch, microsecond = _PG_EPOCH, _MICROSECOND
    rows = [_COPY_SIGNATURE]
    append = rows.append
    for r in stored:
        shares = r.shares
        if shares:
            at = (r.sampled_at - epoch) // microsecond
            for instance_id, share in shares.items():
                append(pack(4, 4, r.gpu_id, 8, at, 4, instance_id, 8, share))
    append(_COPY_TRAILER)
    return b"".join(rows)


@dataclass(frozen=True)
class _Upsert:
    """How a batch's rows meet a rollup table's stored ones: added to, replaced, or spans widened."""

    model: type[Base]
    keys: tuple[str, ...]  # the conflict target
    derived: tuple[str, ...] = ()  # follow from the keys: written by the insert, never updated
    summed: tuple[str, ...] = ()  # stored + new
    replaced: tuple[str, ...] = ()  # new
    spans: bool = False  # from_at: the earlier, to_at: the later, updated_at: new

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.keys + self.derived + self.summed + self.replaced
                + (("from_at", "to_at", "updated_at") if self.spans else ()))


_NODE_HOUR = _Upsert(NodeEnergyHourly, ("node_id", "hour_at"), ("day_at",), ("energy_j", "idle_energy_j"))
_MODEL_HOUR = _Upsert(ModelEnergyHourly, ("model", "hour_at"), summed=("energy_j",))
_INSTANCE_HOUR = _Upsert(InstanceEnergyHourly, ("instance_id", "hour_at"), summed=("energy_j",))
_ACCOUNT_DAY = _Upsert(AccountEnergyDaily, ("account", "user_name", "day_at"), summed=("energy_j",))
_INSTANCE_TOTAL = _Upsert(InstanceEnergy, ("instance_id",), summed=("energy_j",), spans=True)
_JOB_TOTAL = _Upsert(JobEnergy, ("job_id",), summed=("energy_j",), spans=True)
_CURSOR = _Upsert(EnergyCursor, ("gpu_id",), replaced=("sampled_at", "energy_counter_j"))


def _rollup_rows(rollups: BatchPlan, now: datetime) -> list[tuple[_Upsert, list[tuple[Any, ...]]]]:
    """Each rollup table's rows of a batch, in the order of its ``_Upsert.columns``."""
    return [
        (_NODE_HOUR, [(node, _bucket(hour, HOUR_S), _bucket(hour // 24, DAY_S), energy_j, idle_j)
                      for (node, hour), (energy_j, idle_j) in rollups.node_hour.items()]),
        (_MODEL_HOUR, [(model, _bucket(hour, HOUR_S), energy_j)
                       for (model, hour), energy_j in rollups.model_hour.items()]),
        (_INSTANCE_HOUR, [(instance, _bucket(hour, HOUR_S), energy_j)
                          for (instance, hour), energy_j in rollups.instance_hour.items()]),
        (_ACCOUNT_DAY, [(account, user, _bucket(day, DAY_S), energy_j)
                        for (account, user, day), energy_j in rollups.account_day.items()]),
        (_INSTANCE_TOTAL, [(key, e, f, t, now) for key, (e, f, t) in rollups.instances.items()]),
        (_JOB_TOTAL, [(key, e, f, t, now) for key, (e, f, t) in rollups.jobs.items()]),
        (_CURSOR, [(gpu, at, counter) for gpu, (at, counter) in rollups.cursors_after.items()]),
    ]


def _write_rollups(connection: Connection, rollups: BatchPlan, now: datetime) -> None:
    """Add a batch's sums to the rollup rows (insert, or add to the stored value) and move the cursors.

    One statement per table whatever the batch's size: on PostgreSQL the rows travel as one array
    per column (``unnest``), one round trip each; SQLite (in-process, no round trips) takes an
    ``executemany``.
    """
    postgres = connection.dialect.name == "postgresql"
    for upsert, rows in _rollup_rows(rollups, now):
        if not rows:
            continue
        if postgres:
            _upsert_unnest(connection, upsert, rows)
            continue
        table = _table(upsert.model)
        stmt = sqlite.insert(table)
        updates: dict[str, Any] = {name: table.c[name] + stmt.excluded[name] for name in upsert.summed}
        updates.update({name: stmt.excluded[name] for name in upsert.replaced})
        if upsert.spans:
            updates["from_at"] = case((stmt.excluded.from_at < table.c.from_at, stmt.excluded.from_at),
                                      else_=table.c.from_at)
            updates["to_at"] = case((stmt.excluded.to_at > table.c.to_at, stmt.excluded.to_at), else_=table.c.to_at)
            updates["updated_at"] = stmt.excluded.updated_at
        columns = upsert.columns
        connection.execute(stmt.on_conflict_do_update(
            index_elements=list(upsert.keys), set_=updates),
            [dict(zip(columns, row, strict=True)) for row in rows])


def _upsert_unnest(connection: Connection, upsert: _Upsert, rows: list[tuple[Any, ...]]) -> None:
    """``INSERT ... SELECT FROM unnest(one array per column) ON CONFLICT DO UPDATE``: one round trip for all rows."""
    statement, floats = _unnest_statement(upsert)
    # An array is of one type: a counter given as an int (0) goes as the float it is stored as.
    connection.exec_driver_sql(statement, tuple([float(v) for v in column] if is_float else list(column)
                                                for column, is_float in zip(zip(*rows, strict=True), floats,
                                                                            strict=True)))


@functools.cache
def _unnest_statement(upsert: _Upsert) -> tuple[str, tuple[bool, ...]]:
    """The PostgreSQL statement of ``_upsert_unnest`` and which of its columns are floats."""
    table = _table(upsert.model)
    columns = upsert.columns
    dialect = postgresql.dialect()
    # Names and types come from the models, never from the data; the data travels as parameters.
    arrays = ", ".join(f"%s::{table.c[name].type.compile(dialect=dialect)}[]" for name in columns)
    updates = [f"{name} = stored.{name} + EXCLUDED.{name}" for name in upsert.summed]
    updates += [f"{name} = EXCLUDED.{name}" for name in upsert.replaced]
    if upsert.spans:
        updates += ["from_at = LEAST(stored.from_at, EXCLUDED.from_at)",
                    "to_at = GREATEST(stored.to_at, EXCLUDED.to_at)", "updated_at = EXCLUDED.updated_at"]
    statement = (f"INSERT INTO {table.name} AS stored ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
                 f"ON CONFLICT ({', '.join(upsert.keys)}) "
                 f"DO UPDATE SET {', '.join(updates)}")
    return statement, tuple(table.c[name].type.python_type is float for name in columns)


__all__ = ["BatchPlan", "BatchResult", "EnergyReading", "lookup", "plan_batch", "read_cursors", "validate_readings",
           "write_plan", "write_readings"]
