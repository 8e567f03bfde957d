"""Energy ingest: GPU readings stored in batches, each batch with its rollup updates in one transaction.

A reading is a GPU's cumulative NVML energy counter at one time (with its power and, optionally,
the shares of its instances). Energy is the difference between consecutive readings of one GPU:
``write_readings`` keeps each GPU's last reading in ``energy_cursors``, differences every new
reading against the one before it, and adds the difference to the rollups in the bucket of the
reading that closes it:

- ``job_energy`` / ``instance_energy``: the share of each instance, to it and to its Slurm job;
- ``model_energy_hourly``: the instances' shares, per model per UTC hour;
- ``instance_energy_hourly``: each instance's share per UTC hour (what the tenant report splits over
  the requests the instance served in that hour);
- ``account_energy_daily``: the instances' shares, per Slurm account and user (of the instance's
  job; "" when it has none) per UTC day;
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
cursor guarantees they are new), SQLite through one ``executemany``; the rollups are a handful
of upserts per batch whatever its size.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Table, case, select
from sqlalchemy.dialects import postgresql, sqlite

from festina_hpc.db.errors import DatabaseError, InvalidRecord
from festina_hpc.db.models import (
    AccountEnergyDaily,
    Base,
    EnergyCursor,
    EnergySample,
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


def _fast_ok(reading: EnergyReading) -> bool:
    """The common case checked in a few comparisons; anything else goes through the checks that name the field."""
    power_w = reading.power_w
    counter = reading.energy_counter_j
    at = reading.sampled_at
    if not (type(reading.gpu_id) is int and type(counter) is float and 0.0 <= counter < math.inf
            and (power_w is None or (type(power_w) is float and 0.0 <= power_w < math.inf))
            and type(at) is datetime and at.tzinfo is not None):
        return False
    shares = reading.shares
    if shares:
        total = 0.0
        for instance_id, share in shares.items():
            if not (type(instance_id) is int and type(share) is float and 0.0 <= share <= 1.0):
                return False
            total += share
        return total <= 1.0 + 1e-9
    return True


def validate_readings(readings: Sequence[EnergyReading]) -> None:
    """Refuse a bad reading before anything is written, naming the reading, field and value."""
    for i, reading in enumerate(readings):
        if _fast_ok(reading):
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


def _gpu_and_time(reading: EnergyReading) -> tuple[int, datetime]:
    return reading.gpu_id, reading.sampled_at


def plan_batch(readings: Sequence[EnergyReading], node_of: Mapping[int, int], instances: Mapping[int, InstanceInfo],
               cursors: Mapping[int, Cursor]) -> BatchPlan:
    """Difference validated readings against their GPUs' cursors and sum them into rollup buckets (pure)."""
    gpus = {r.gpu_id for r in readings}
    plan = BatchPlan([], 0, {gpu: cursors.get(gpu) for gpu in gpus}, {})
    stored = plan.stored
    node_hour, model_hour, account_day = plan.node_hour, plan.model_hour, plan.account_day
    instance_hour = plan.instance_hour
    instance_totals, job_totals = plan.instances, plan.jobs
    energy_j = 0.0
    current_gpu = -1
    node = -1
    previous_at: datetime | None = None
    previous_counter = 0.0
    # Sorted by GPU, then time: each GPU's readings difference in order, whatever order they came in.
    for reading in sorted(readings, key=_gpu_and_time):
        if reading.gpu_id != current_gpu:
            if previous_at is not None:
                plan.cursors_after[current_gpu] = (previous_at, previous_counter)
            current_gpu = reading.gpu_id
            node = node_of[current_gpu]
            cursor = cursors.get(current_gpu)
            previous_at, previous_counter = cursor if cursor is not None else (None, 0.0)
        at = reading.sampled_at
        if previous_at is not None and at <= previous_at:
            plan.skipped += 1
            continue
        stored.append(reading)
        counter = reading.energy_counter_j
        if previous_at is not None:
            delta_j = counter - previous_counter if counter >= previous_counter else counter
            energy_j += delta_j
            hour = int(at.timestamp() // HOUR_S)
            claimed = 0.0
            for instance_id, share in reading.shares.items():
                part_j = delta_j * share
                claimed += share
                model, job_id, account, user = instances[instance_id]
                key = (model, hour)
                model_hour[key] = model_hour.get(key, 0.0) + part_j
                instance_key = (instance_id, hour)
                instance_hour[instance_key] = instance_hour.get(instance_key, 0.0) + part_j
                day_key = (account, user, hour // 24)
                account_day[day_key] = account_day.get(day_key, 0.0) + part_j
                _add_total(instance_totals, instance_id, part_j, previous_at, at)
                if job_id is not None:
                    _add_total(job_totals, job_id, part_j, previous_at, at)
            totals = node_hour.get((node, hour))
            if totals is None:
                totals = node_hour[(node, hour)] = [0.0, 0.0]
            totals[0] += delta_j
            # max(): shares summing to 1 up to rounding leave no negative idle energy.
            totals[1] += delta_j * max(0.0, 1.0 - claimed)
        previous_at, previous_counter = at, counter
    if previous_at is not None:
        plan.cursors_after[current_gpu] = (previous_at, previous_counter)
    plan.energy_j = energy_j
    return plan


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
    # SQLite: one executemany each, the times in the text form UtcDateTime stores (its own processor).
    samples = [(r.gpu_id, r.sampled_at, r.energy_counter_j, r.power_w) for r in stored]
    shares = [(r.gpu_id, r.sampled_at, instance_id, share) for r in stored for instance_id, share in r.shares.items()]
    to_text = _table(EnergySample).c.sampled_at.type.dialect_impl(connection.dialect).bind_processor(
        connection.dialect)
    assert to_text is not None
    connection.exec_driver_sql(
        "INSERT INTO energy_samples (gpu_id, sampled_at, energy_counter_j, power_w) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING", [(g, to_text(t), e, p) for g, t, e, p in samples])
    if shares:
        connection.exec_driver_sql(
            "INSERT INTO energy_sample_shares (gpu_id, sampled_at, instance_id, share_frac) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING", [(g, to_text(t), i, s) for g, t, i, s in shares])


# PostgreSQL's binary COPY format, packed here in one struct call per row: psycopg's write_row
# costs several times more per row, in the thread that also holds the GIL for the next batch.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" * 2
_COPY_TRAILER = b"\xff\xff"
# Each row: field count; then per field its byte length and value (length -1: NULL).
_SAMPLE_ROW = struct.Struct(">hiiiqidid")  # gpu_id int4, sampled_at timestamptz, counter float8, power float8
_SAMPLE_ROW_NO_POWER = struct.Struct(">hiiiqidi")
_SHARE_ROW = struct.Struct(">hiiiqiiid")  # gpu_id int4, sampled_at timestamptz, instance_id int4, share float8


def _pg_microseconds(at: datetime) -> int:
    """A timestamptz as PostgreSQL stores it: microseconds since 2000-01-01 UTC (exact integer arithmetic)."""
    delta = at - _PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _binary_samples(stored: Sequence[EnergyReading]) -> bytes:
    with_power, no_power = _SAMPLE_ROW.pack, _SAMPLE_ROW_NO_POWER.pack
    rows = [_COPY_SIGNATURE]
    for r in stored:
        at = _pg_microseconds(r.sampled_at)
        if r.power_w is None:
            rows.append(no_power(4, 4, r.gpu_id, 8, at, 8, r.energy_counter_j, -1))
        else:
            rows.append(with_power(4, 4, r.gpu_id, 8, at, 8, r.energy_counter_j, 8, r.power_w))
    rows.append(_COPY_TRAILER)
    return b"".join(rows)


def _binary_shares(stored: Sequence[EnergyReading]) -> bytes:
    pack = _SHARE_ROW.pack
    rows = [_COPY_SIGNATURE]
    for r in stored:
        if r.shares:
            at = _pg_microseconds(r.sampled_at)
            rows.extend(pack(4, 4, r.gpu_id, 8, at, 4, instance_id, 8, share)
                        for instance_id, share in r.shares.items())
    rows.append(_COPY_TRAILER)
    return b"".join(rows)


def _write_rollups(connection: Connection, rollups: BatchPlan, now: datetime) -> None:
    """Add a batch's sums to the rollup rows (insert, or add to the stored value) and move the cursors."""
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert

    def add_to(model: type[Base], rows: list[dict[str, Any]], keys: Sequence[str],
               summed: Sequence[str], spans: bool = False) -> None:
        if not rows:
            return
        table = _table(model)
        stmt = insert(table)
        updates: dict[str, Any] = {name: table.c[name] + stmt.excluded[name] for name in summed}
        if spans:
            updates["from_at"] = case((stmt.excluded.from_at < table.c.from_at, stmt.excluded.from_at),
                                      else_=table.c.from_at)
            updates["to_at"] = case((stmt.excluded.to_at > table.c.to_at, stmt.excluded.to_at), else_=table.c.to_at)
            updates["updated_at"] = stmt.excluded.updated_at
        connection.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=updates), rows)

    add_to(NodeEnergyHourly, [
        {"node_id": node, "hour_at": _bucket(hour, HOUR_S), "day_at": _bucket(hour // 24, DAY_S),
         "energy_j": energy_j, "idle_energy_j": idle_j}
        for (node, hour), (energy_j, idle_j) in rollups.node_hour.items()], ["node_id", "hour_at"],
        ["energy_j", "idle_energy_j"])
    add_to(ModelEnergyHourly, [{"model": model, "hour_at": _bucket(hour, HOUR_S), "energy_j": energy_j}
                               for (model, hour), energy_j in rollups.model_hour.items()],
           ["model", "hour_at"], ["energy_j"])
    add_to(InstanceEnergyHourly, [{"instance_id": instance, "hour_at": _bucket(hour, HOUR_S), "energy_j": energy_j}
                                  for (instance, hour), energy_j in rollups.instance_hour.items()],
           ["instance_id", "hour_at"], ["energy_j"])
    add_to(AccountEnergyDaily, [
        {"account": account, "user_name": user, "day_at": _bucket(day, DAY_S), "energy_j": energy_j}
        for (account, user, day), energy_j in rollups.account_day.items()], ["account", "user_name", "day_at"],
        ["energy_j"])
    add_to(InstanceEnergy, [{"instance_id": key, "energy_j": e, "from_at": f, "to_at": t, "updated_at": now}
                            for key, (e, f, t) in rollups.instances.items()], ["instance_id"], ["energy_j"], True)
    add_to(JobEnergy, [{"job_id": key, "energy_j": e, "from_at": f, "to_at": t, "updated_at": now}
                       for key, (e, f, t) in rollups.jobs.items()], ["job_id"], ["energy_j"], True)
    if rollups.cursors_after:
        table = _table(EnergyCursor)
        stmt = insert(table)
        connection.execute(stmt.on_conflict_do_update(
            index_elements=["gpu_id"], set_={"sampled_at": stmt.excluded.sampled_at,
                                             "energy_counter_j": stmt.excluded.energy_counter_j}),
            [{"gpu_id": gpu, "sampled_at": at, "energy_counter_j": counter}
             for gpu, (at, counter) in rollups.cursors_after.items()])


__all__ = ["BatchPlan", "BatchResult", "EnergyReading", "lookup", "plan_batch", "read_cursors", "validate_readings",
           "write_plan", "write_readings"]
