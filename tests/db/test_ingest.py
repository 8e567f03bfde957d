"""festina_hpc.db.ingest on SQLite and PostgreSQL: rollups equal the hand-worked answers and the sums of
their samples, whatever the batching and order; a failure or a crash mid-ingest keeps every committed
batch whole and nothing of the failed one."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import URL

from festina_hpc.db import ingest, migrate
from festina_hpc.db.errors import DatabaseError, InvalidRecord
from festina_hpc.db.ingest import EnergyReading
from festina_hpc.db.models import (
    AccountEnergyDaily,
    EnergyCursor,
    EnergySample,
    EnergySampleShare,
    InstanceEnergy,
    JobEnergy,
    ModelEnergyHourly,
    ModelInstance,
    Node,
    NodeEnergyHourly,
)
from festina_hpc.db.store import Store
from tests.db import accounting_fixture as fx
from tests.db.conftest import TickingClock, make_cluster


def rollups(engine: Engine) -> dict[str, Any]:
    """Every rollup as plain data, energies rounded to the µJ (float sums in another order differ in the last bit)."""
    with engine.connect() as c:
        instances = dict(c.execute(select(ModelInstance.id, InstanceEnergy.energy_j).join(
            InstanceEnergy, InstanceEnergy.instance_id == ModelInstance.id)).all())
        return {
            "jobs": {j: round(e, 6) for j, e in c.execute(select(JobEnergy.job_id, JobEnergy.energy_j))},
            "instances": {i: round(e, 6) for i, e in instances.items()},
            "model_hour": {(m, h): round(e, 6) for m, h, e in c.execute(
                select(ModelEnergyHourly.model, ModelEnergyHourly.hour_at, ModelEnergyHourly.energy_j))},
            "account_day": {(a, u, d): round(e, 6) for a, u, d, e in c.execute(
                select(AccountEnergyDaily.account, AccountEnergyDaily.user_name, AccountEnergyDaily.day_at,
                       AccountEnergyDaily.energy_j))},
            "node_hour": {(n, h): (round(e, 6), round(i, 6)) for n, h, e, i in c.execute(
                select(Node.name, NodeEnergyHourly.hour_at, NodeEnergyHourly.energy_j, NodeEnergyHourly.idle_energy_j)
                .join(Node, Node.id == NodeEnergyHourly.node_id))},
            "samples": c.execute(select(func.count()).select_from(EnergySample)).scalar_one(),
            "shares": c.execute(select(func.count()).select_from(EnergySampleShare)).scalar_one(),
        }


def expected(instances: dict[str, int]) -> dict[str, Any]:
    return {"jobs": fx.JOB_ENERGY_J, "instances": {instances[k]: e for k, e in fx.INSTANCE_ENERGY_J.items()},
            "model_hour": fx.MODEL_HOUR_J, "account_day": fx.ACCOUNT_DAY_J, "node_hour": fx.NODE_HOUR_J,
            "samples": 8, "shares": 5}


def job_energy_from_samples(engine: Engine) -> dict[int, float]:
    """Each job's energy recomputed from the raw samples and shares alone, independently of the ingest."""
    with engine.connect() as c:
        samples = c.execute(select(EnergySample.gpu_id, EnergySample.sampled_at, EnergySample.energy_counter_j)
                            .order_by(EnergySample.gpu_id, EnergySample.sampled_at)).all()
        shares = c.execute(select(EnergySampleShare.gpu_id, EnergySampleShare.sampled_at, ModelInstance.slurm_job_id,
                                  EnergySampleShare.share_frac)
                           .join(ModelInstance, ModelInstance.id == EnergySampleShare.instance_id)).all()
    delta: dict[tuple[int, Any], float] = {}
    for previous, sample in zip(samples, samples[1:]):
        if previous.gpu_id == sample.gpu_id:
            counter = sample.energy_counter_j
            delta[(sample.gpu_id, sample.sampled_at)] = (counter - previous.energy_counter_j
                                                         if counter >= previous.energy_counter_j else counter)
    totals: dict[int, float] = {}
    for gpu, sampled_at, job, share in shares:
        totals[job] = totals.get(job, 0.0) + delta.get((gpu, sampled_at), 0.0) * share
    return totals


def test_rollups_are_the_hand_worked_answers(store: Store, migrated: Engine) -> None:
    instances = fx.load(store)
    assert rollups(migrated) == expected(instances)
    with migrated.connect() as c:
        spans = {j: (f, t) for j, f, t in c.execute(select(JobEnergy.job_id, JobEnergy.from_at, JobEnergy.to_at))}
        total, idle = c.execute(select(func.sum(NodeEnergyHourly.energy_j),
                                       func.sum(NodeEnergyHourly.idle_energy_j))).one()
    assert spans == {101: (fx.T0, fx.at(3660)), 102: (fx.T0, fx.at(86400))}
    assert (total, idle) == (fx.TOTAL_J, fx.IDLE_J)


def test_energy_total_of_every_job_equals_the_sum_of_its_samples(store: Store, migrated: Engine) -> None:
    fx.load(store)
    assert job_energy_from_samples(migrated) == pytest.approx(fx.JOB_ENERGY_J)
    assert rollups(migrated)["jobs"] == pytest.approx(job_energy_from_samples(migrated))


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_any_batching_and_order_gives_the_same_rollups_and_re_reading_counts_nothing(
        store: Store, migrated: Engine, batch_size: int) -> None:
    instances, readings = fx.build(store)
    shuffled = list(readings)
    random.Random(batch_size).shuffle(shuffled)
    # Late readings in a later batch than their successors are skipped; sorted batches lose none.
    in_time_order = sorted(shuffled, key=lambda r: r.sampled_at)
    stats = store.ingest_energy(in_time_order, batch_size=batch_size)
    assert (stats.readings, stats.stored, stats.skipped) == (8, 8, 0)
    assert stats.batches == -(-8 // batch_size) and stats.energy_j == pytest.approx(fx.TOTAL_J)
    again = store.ingest_energy(shuffled, batch_size=batch_size)  # a sampler re-sending after a restart
    assert (again.stored, again.skipped, again.energy_j) == (0, 8, 0.0)
    assert rollups(migrated) == expected(instances)


def test_a_batch_in_any_order_is_differenced_in_time_order(store: Store, migrated: Engine) -> None:
    instances, readings = fx.build(store)
    assert store.record_energy(list(reversed(readings))) == 8
    assert rollups(migrated) == expected(instances)


def test_a_failure_mid_ingest_keeps_committed_batches_whole_and_nothing_of_the_failed_one(
        store: Store, migrated: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    instances, readings = fx.build(store)
    ordered = sorted(readings, key=lambda r: r.sampled_at)
    real = ingest._write_rollups
    calls = {"n": 0}

    def fail_on_second(connection: Any, batch: Any, now: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the samples of batch 2 are already written in its transaction
            raise RuntimeError("power cut")
        real(connection, batch, now)

    monkeypatch.setattr(ingest, "_write_rollups", fail_on_second)
    with pytest.raises(RuntimeError, match="power cut"):
        store.ingest_energy(ordered, batch_size=4)
    after_failure = rollups(migrated)
    assert after_failure["samples"] == 4  # batch 1 only
    # Batch 1 (the three T0 readings and n02/1 at T0+1 min) is whole: n02/1's 1200 idle J, no job energy.
    first = Store(migrated, clock=TickingClock())
    assert after_failure["node_hour"] == {("n02", fx.H12): (1200.0, 1200.0)}
    assert after_failure["jobs"] == {}
    with migrated.connect() as c:
        cursors = {gpu: at for gpu, at in c.execute(select(EnergyCursor.gpu_id, EnergyCursor.sampled_at))}
    assert sorted(cursors.values()) == [fx.T0, fx.T0, fx.at(60)]
    monkeypatch.setattr(ingest, "_write_rollups", real)
    resumed = first.ingest_energy(ordered, batch_size=4)  # the sampler sends everything again
    assert (resumed.stored, resumed.skipped) == (4, 4)
    assert rollups(migrated) == expected(instances)


CRASH_SCRIPT = textwrap.dedent("""
    import os, pickle, sys
    from festina_hpc.db import ingest
    from festina_hpc.db.engine import make_engine
    from festina_hpc.db.store import Store

    url, readings = pickle.load(sys.stdin.buffer)
    real = ingest._write_rollups
    calls = []

    def crash_on_second(connection, batch, now):
        calls.append(1)
        if len(calls) == 2:
            os._exit(17)  # the process dies with batch 2's samples written but not committed
        real(connection, batch, now)

    ingest._write_rollups = crash_on_second
    Store(make_engine(url)).ingest_energy(readings, batch_size=4)
""")


def test_a_process_killed_mid_batch_leaves_the_committed_batches_and_no_half_batch(
        store: Store, migrated: Engine, db_url: URL) -> None:
    import pickle

    instances, readings = fx.build(store)
    ordered = sorted(readings, key=lambda r: r.sampled_at)
    payload = pickle.dumps((db_url.render_as_string(hide_password=False), ordered))
    done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT], input=payload, capture_output=True, timeout=120,
                          check=False)
    assert done.returncode == 17, done.stderr.decode()
    after_crash = rollups(migrated)
    assert after_crash["samples"] == 4
    assert after_crash["node_hour"] == {("n02", fx.H12): (1200.0, 1200.0)}
    store.ingest_energy(ordered, batch_size=4)
    assert rollups(migrated) == expected(instances)


@pytest.mark.parametrize(("case", "reading", "message"), [
    ("unknown GPU", lambda g, i: EnergyReading(999, fx.at(5), 1.0),
     "energy_samples[1] (gpu 999).gpu_id = 999 is not a known GPU"),
    ("unknown instance", lambda g, i: EnergyReading(g, fx.at(5), 1.0, shares={4242: 0.5}),
     "energy_samples[1] (gpu {g}).shares key = 4242 is not a known instance"),
    ("shares above 1", lambda g, i: EnergyReading(g, fx.at(5), 1.0, shares={i: 0.6, i + 1: 0.6}),
     "energy_samples[1] (gpu {g}).shares = {{{i}: 0.6, {j}: 0.6}} sum to more than 1"),
])
def test_a_bad_reading_refuses_the_whole_batch_naming_it(store: Store, migrated: Engine, case: str,
                                                         reading: Any, message: str) -> None:
    instances, _ = fx.build(store)
    gpu = 1
    batch: Sequence[EnergyReading] = [EnergyReading(gpu, fx.T0, 0.0), reading(gpu, instances["A"])]
    with pytest.raises(InvalidRecord) as info:
        store.record_energy(batch)
    assert str(info.value) == message.format(g=gpu, i=instances["A"], j=instances["A"] + 1), case
    assert rollups(migrated)["samples"] == 0


def test_batch_size_must_be_positive(store: Store) -> None:
    with pytest.raises(InvalidRecord, match=r"^batch_size = 0 must be a positive integer$"):
        store.ingest_energy([], batch_size=0)


def test_upgrading_a_database_with_samples_seeds_each_gpus_cursor(engine: Engine) -> None:
    migrate.upgrade(engine, "0001")
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO nodes (id, name, state, powered, gpu_count, updated_at) "
                          "VALUES (1, 'n01', 'idle', true, 1, '2026-03-01 12:00:00.000000')")
        c.exec_driver_sql("INSERT INTO gpus (id, node_id, gpu_index, gpu_type, updated_at) "
                          "VALUES (1, 1, 0, 'h100-sxm-80gb', '2026-03-01 12:00:00.000000')")
    store = Store(engine, clock=TickingClock())
    with engine.begin() as c:  # through the 0001 schema: plain inserts, as the old store wrote them
        c.execute(EnergySample.__table__.insert(), [  # type: ignore[attr-defined]
            {"gpu_id": 1, "sampled_at": fx.at(k), "energy_counter_j": 100.0 * k, "power_w": None} for k in range(3)])
    migrate.upgrade(engine)
    with engine.connect() as c:
        assert c.execute(select(EnergyCursor.gpu_id, EnergyCursor.sampled_at, EnergyCursor.energy_counter_j)
                         ).all() == [(1, fx.at(2), 200.0)]
    store.record_energy([EnergyReading(1, fx.at(1), 100.0), EnergyReading(1, fx.at(3), 350.0)])
    assert rollups(engine)["node_hour"] == {("n01", fx.H12): (150.0, 150.0)}


def test_sequential_and_pipelined_ingest_agree(store: Store, migrated: Engine) -> None:
    instances, readings = fx.build(store)
    ordered = sorted(readings, key=lambda r: r.sampled_at)
    stats = store.ingest_energy(ordered, batch_size=3, pipeline=False)
    assert (stats.stored, stats.batches) == (8, 3)
    assert rollups(migrated) == expected(instances)


def test_a_planned_batch_whose_cursor_another_writer_moved_is_refused(store: Store, migrated: Engine,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, readings = fx.build(store)
    ordered = sorted(readings, key=lambda r: r.sampled_at)
    real = ingest.plan_batch
    planned = {"n": 0}

    def plan_then_race(*args: Any) -> Any:
        plan = real(*args)
        planned["n"] += 1
        if planned["n"] == 2:  # another writer ingests n01/0's next reading before our batch 2 is written
            deadline = time.monotonic() + 30
            while rollups(migrated)["samples"] < 4 and time.monotonic() < deadline:  # batch 1 committed
                time.sleep(0.01)
            Store(migrated, clock=TickingClock()).record_energy([EnergyReading(1, fx.at(1), 1001.0)])
        return plan

    monkeypatch.setattr("festina_hpc.db.store.plan_batch", plan_then_race)
    with pytest.raises(DatabaseError, match=r"^energy_cursors: gpu 1 was ingested by another writer at the same time"):
        store.ingest_energy(ordered, batch_size=4, pipeline=True)  # SQLite's default is batch after batch


def test_samples_and_shares_read_back_exactly_as_written(store: Store, migrated: Engine) -> None:
    instances, _ = fx.build(store)
    odd = timezone(timedelta(hours=-7, minutes=-30))
    written = [EnergyReading(1, fx.at(0.000001).astimezone(odd), 12.5, None),
               EnergyReading(1, fx.at(1.5), 1e12 + 0.25, 712.125, shares={instances["A"]: 0.5, instances["B"]: 0.125}),
               EnergyReading(2, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), 0, 0.0)]
    store.record_energy(written)
    with migrated.connect() as c:
        samples = c.execute(select(EnergySample.gpu_id, EnergySample.sampled_at, EnergySample.energy_counter_j,
                                   EnergySample.power_w).order_by(EnergySample.gpu_id, EnergySample.sampled_at)).all()
        shares = c.execute(select(EnergySampleShare.sampled_at, EnergySampleShare.instance_id,
                                  EnergySampleShare.share_frac).order_by(EnergySampleShare.instance_id)).all()
    assert [tuple(s) for s in samples] == [(1, fx.at(0.000001), 12.5, None), (1, fx.at(1.5), 1e12 + 0.25, 712.125),
                                           (2, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), 0.0, 0.0)]
    assert [tuple(s) for s in shares] == [(fx.at(1.5), instances["A"], 0.5), (fx.at(1.5), instances["B"], 0.125)]


def reference_rollups(readings: Sequence[EnergyReading], node_of: dict[int, str],
                      instances: dict[int, tuple[str, int | None, str, str]]) -> dict[tuple[Any, ...], float]:
    """The rollups worked out reading by reading, as the ingest's rules say, independently of its code:
    each GPU's readings in time order, one reading per time (the first given), the first only a start,
    a lower counter a restart; each difference split by its reading's shares into its UTC hour and day."""
    out: dict[tuple[Any, ...], float] = {}
    spans: dict[tuple[str, int], list[datetime]] = {}

    def add(key: tuple[Any, ...], energy_j: float) -> None:
        out[key] = out.get(key, 0.0) + energy_j

    def span(key: tuple[str, int], from_at: datetime, to_at: datetime) -> None:
        now = spans.setdefault(key, [from_at, to_at])
        now[0], now[1] = min(now[0], from_at), max(now[1], to_at)

    for gpu in sorted({r.gpu_id for r in readings}):
        mine = sorted((r for r in readings if r.gpu_id == gpu), key=lambda r: r.sampled_at)
        previous = mine[0]
        for reading in mine[1:]:
            if reading.sampled_at == previous.sampled_at:
                continue
            counter, before = reading.energy_counter_j, previous.energy_counter_j
            delta = counter - before if counter >= before else counter
            hour = reading.sampled_at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
            day = hour.replace(hour=0)
            add(("node", node_of[gpu], hour), delta)
            add(("idle", node_of[gpu], hour), delta * max(0.0, 1.0 - sum(reading.shares.values())))
            for instance, share in reading.shares.items():
                model, job, account, user = instances[instance]
                add(("model", model, hour), delta * share)
                add(("account", account, user, day), delta * share)
                add(("instance", instance), delta * share)
                span(("instance", instance), previous.sampled_at, reading.sampled_at)
                if job is not None:
                    add(("job", job), delta * share)
                    span(("job", job), previous.sampled_at, reading.sampled_at)
            previous = reading
    out.update({(*key, "from"): from_at.timestamp() for key, (from_at, _) in spans.items()})
    out.update({(*key, "to"): to_at.timestamp() for key, (_, to_at) in spans.items()})
    return out


def stored_rollups(engine: Engine) -> dict[tuple[Any, ...], float]:
    """The stored rollups in ``reference_rollups``'s shape (unrounded)."""
    out: dict[tuple[Any, ...], float] = {}
    with engine.connect() as c:
        for node, hour, energy, idle in c.execute(select(Node.name, NodeEnergyHourly.hour_at, NodeEnergyHourly.energy_j,
                                                         NodeEnergyHourly.idle_energy_j)
                                                  .join(Node, Node.id == NodeEnergyHourly.node_id)):
            out[("node", node, hour)], out[("idle", node, hour)] = energy, idle
        out.update((("model", m, h), e) for m, h, e in c.execute(
            select(ModelEnergyHourly.model, ModelEnergyHourly.hour_at, ModelEnergyHourly.energy_j)))
        out.update((("account", a, u, d), e) for a, u, d, e in c.execute(
            select(AccountEnergyDaily.account, AccountEnergyDaily.user_name, AccountEnergyDaily.day_at,
                   AccountEnergyDaily.energy_j)))
        for name, model in (("instance", InstanceEnergy), ("job", JobEnergy)):
            key_column = InstanceEnergy.instance_id if model is InstanceEnergy else JobEnergy.job_id
            for key, energy, from_at, to_at in c.execute(select(key_column, model.energy_j, model.from_at,
                                                                model.to_at)):
                out[(name, key)] = energy
                out[(name, key, "from")], out[(name, key, "to")] = from_at.timestamp(), to_at.timestamp()
    return out


def random_readings(store: Store, seed: int) -> tuple[list[EnergyReading], dict[int, str],
                                                      dict[int, tuple[str, int | None, str, str]]]:
    """Six GPUs over three nodes, eight instances (one without a job), 3,000 readings over two days in random
    order: random gaps (some a microsecond from an hour's end), counter restarts, re-sent readings, shares
    that change, are shared between readings as one object, sum to 1, to less, or are absent."""
    from festina_hpc.db.store import JobRecord

    rng = random.Random(seed)
    gpus = make_cluster(store, nodes=3, gpus_per_node=2)
    node_of = {gpu: name for (name, _), gpu in gpus.items()}
    store.upsert_jobs([JobRecord(200 + k, "RUNNING", user_name=f"u{k % 3}", account=f"acct{k % 2}", start_at=fx.T0)
                       for k in range(7)])
    instances: dict[int, tuple[str, int | None, str, str]] = {}
    for k in range(8):
        job = 200 + k if k < 7 else None
        instance = store.create_instance(("llama-3.1-8b", "mistral-7b", "llama-3.1-70b")[k % 3],
                                         [sorted(gpus.values())[k % 6]], at=fx.T0, sm_pct=50, memory_fraction=0.4,
                                         slurm_job_id=job)
        instances[instance] = (("llama-3.1-8b", "mistral-7b", "llama-3.1-70b")[k % 3], job,
                               f"acct{k % 2}" if job is not None else "", f"u{k % 3}" if job is not None else "")
    ids = sorted(instances)
    readings: list[EnergyReading] = []
    for gpu in gpus.values():
        at, counter, shares = fx.T0 - timedelta(minutes=rng.randrange(60)), rng.uniform(0, 1e6), {}
        for _ in range(500):
            if rng.random() < 0.1:  # new shares: a random subset summing to at most 1
                chosen = rng.sample(ids, rng.randrange(0, 3))
                weights = [rng.random() for _ in chosen]
                scale = (1.0 if rng.random() < 0.5 else rng.uniform(0.2, 1.0)) / (sum(weights) or 1.0)
                shares = {i: min(1.0, w * scale) for i, w in zip(chosen, weights, strict=True)}
                if sum(shares.values()) > 1.0:
                    shares = {i: s / 1.0000001 for i, s in shares.items()}
            gap_s = rng.choice([1.0, 7.5, 300.0, 0.000001]) if rng.random() < 0.9 else rng.uniform(1, 5000)
            at += timedelta(seconds=gap_s)
            if rng.random() < 0.05:  # a microsecond before the next hour
                at = at.replace(minute=59, second=59, microsecond=999999)
            counter = rng.uniform(0, 500) if rng.random() < 0.01 else counter + rng.uniform(0, 2000)
            readings.append(EnergyReading(gpu, at, counter, rng.uniform(50, 700), shares))
    resent = rng.sample(readings, 100)  # a sampler re-sending some: same GPU and time, first one counts
    readings += [EnergyReading(r.gpu_id, r.sampled_at, r.energy_counter_j + 1.0, r.power_w, r.shares) for r in resent]
    return readings, node_of, instances


@pytest.mark.parametrize("pipeline", [None, False, True])
def test_the_ingest_rollups_equal_the_reading_by_reading_reference_on_a_random_batch(
        store: Store, migrated: Engine, pipeline: bool | None) -> None:
    readings, node_of, instances = random_readings(store, seed=21)
    reference = reference_rollups(readings, node_of, instances)
    stats = store.ingest_energy(readings, batch_size=len(readings), pipeline=pipeline)  # one batch: any order
    assert (stats.stored, stats.skipped) == (3000, 100)
    stored = stored_rollups(migrated)
    assert set(stored) == set(reference)
    assert stored == pytest.approx(reference, rel=1e-9, abs=1e-6)
    assert rollups(migrated)["shares"] == sum(len(r.shares) for r in readings[:3000])


def test_the_ingest_rollups_equal_the_reference_whatever_the_batching(store: Store, migrated: Engine) -> None:
    readings, node_of, instances = random_readings(store, seed=7)
    in_time_order = sorted(readings, key=lambda r: r.sampled_at)  # batches split anywhere lose no difference
    reference = reference_rollups(readings, node_of, instances)
    stats = store.ingest_energy(in_time_order, batch_size=977)
    assert (stats.stored, stats.skipped) == (3000, 100)
    assert stored_rollups(migrated) == pytest.approx(reference, rel=1e-9, abs=1e-6)
