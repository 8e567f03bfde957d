"""festina_hpc.db.store on SQLite and PostgreSQL: cluster state, the restart round trip, batched
records, decisions from plans, and bad input refused whole with a message naming field and value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select
from sqlalchemy.exc import IntegrityError

from festina_hpc.db.engine import make_engine
from festina_hpc.db.errors import DatabaseError, InvalidRecord
from festina_hpc.db.models import (
    EnergySample,
    EnergySampleShare,
    RequestInFlight,
    RequestRecord,
    SlurmJob,
    TenantTokensHourly,
)
from festina_hpc.db.store import (
    EnergyReading,
    GpuRecord,
    JobRecord,
    NodeRecord,
    Store,
    decision_row,
)
from festina_hpc.policy.types import (
    Drop,
    GpuSettings,
    InstancePhase,
    Migrate,
    MoveQueued,
    Plan,
    PowerOff,
    PowerOn,
    Route,
    StartInstance,
    StopInstance,
)
from tests.db.conftest import T0, TickingClock, at, make_cluster, make_outcome


def _count(engine: Engine, model: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(model)).scalar_one())


# -- nodes, GPUs, jobs ---------------------------------------------------------------------------


def test_upserting_nodes_and_gpus_keeps_their_ids(store: Store) -> None:
    gpus = make_cluster(store)
    assert sorted(gpus) == [("n01", 0), ("n01", 1), ("n02", 0), ("n02", 1)]
    node_ids = store.upsert_nodes([NodeRecord("n02", "down+drain", False, 2)])
    again = store.upsert_gpus([GpuRecord("n02", 1, "h100-sxm-80gb", uuid="GPU-n02-1", clock_mhz=1410, power_w=312.5)])
    assert again == {("n02", 0): gpus[("n02", 0)], ("n02", 1): gpus[("n02", 1)]}
    state = store.load_live_state()
    n02 = next(n for n in state.nodes if n.name == "n02")
    assert (n02.id, n02.state, n02.powered) == (node_ids["n02"], "down+drain", False)
    gpu = next(g for g in state.gpus if g.id == gpus[("n02", 1)])
    assert (gpu.clock_mhz, gpu.power_w, gpu.node_id) == (1410, 312.5, node_ids["n02"])
    assert [(g.node_id, g.gpu_index) for g in state.gpus] == sorted((g.node_id, g.gpu_index) for g in state.gpus)


def test_gpu_of_an_unknown_node_is_refused(store: Store) -> None:
    with pytest.raises(InvalidRecord, match=r"^gpus\[0\]\.node = 'n99' is not a known node"):
        store.upsert_gpus([GpuRecord("n99", 0, "h100-sxm-80gb")])


def test_a_job_update_without_times_or_energy_keeps_the_known_ones(store: Store, migrated: Engine) -> None:
    store.upsert_jobs([JobRecord(41, "RUNNING", name="serve-llama", user_name="festina", account="ops",
                                 partition="gpu", node_list="n01", gres="gpu:h100:1", submit_at=at(-5),
                                 start_at=at(0))])
    store.upsert_jobs([JobRecord(41, "COMPLETED", name="serve-llama", user_name="festina", account="ops",
                                 partition="gpu", node_list="n01", gres="gpu:h100:1", end_at=at(60),
                                 energy_j=1234.5)])
    store.upsert_jobs([JobRecord(41, "COMPLETED")])
    with migrated.connect() as connection:
        job = connection.execute(select(SlurmJob)).one()
    assert (job.state, job.submit_at, job.start_at, job.end_at, job.energy_j) == (
        "COMPLETED", at(-5), at(0), at(60), 1234.5)


def test_the_epilogs_completing_never_replaces_a_final_state_nor_erases_known_texts(
        store: Store, migrated: Engine) -> None:
    """festinad's reconcile wrote the job's end; festina-node's epilog (COMPLETING, only the user known) comes
    after: the end, the exit code and the job's name and account stay."""
    store.upsert_jobs([JobRecord(42, "RUNNING", name="serve-llama", user_name="festina", account="ops",
                                 node_list="n01", start_at=at(0))])
    store.upsert_jobs([JobRecord(42, "FAILED", name="serve-llama", user_name="festina", account="ops",
                                 node_list="n01", end_at=at(60), exit_code=3, exit_signal=0)])
    store.upsert_jobs([JobRecord(42, "COMPLETING", user_name="festina", node_list="n01")])
    with migrated.connect() as connection:
        job = connection.execute(select(SlurmJob)).one()
    assert (job.state, job.name, job.account, job.end_at, job.exit_code, job.exit_signal) == (
        "FAILED", "serve-llama", "ops", at(60), 3, 0)
    assert store.open_jobs() == []
    # A requeued job runs again: its new state is taken.
    store.upsert_jobs([JobRecord(42, "PENDING")])
    with migrated.connect() as connection:
        assert connection.execute(select(SlurmJob.state)).scalar_one() == "PENDING"


def test_open_jobs_are_those_without_an_end(store: Store) -> None:
    store.upsert_jobs([JobRecord(50, "RUNNING", account="ops", start_at=at(0)),
                       JobRecord(51, "COMPLETED", start_at=at(0), end_at=at(5), exit_code=0, exit_signal=0),
                       JobRecord(52, "COMPLETING", user_name="alice")])
    assert [(j.job_id, j.state, j.account) for j in store.open_jobs()] == [(50, "RUNNING", "ops"),
                                                                         (52, "COMPLETING", "")]


# -- instances -------------------------------------------------------------------------------------


def test_instance_lifecycle_moves_forward_and_stamps_its_times(store: Store) -> None:
    gpus = make_cluster(store)
    instance = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=at(0), sm_pct=50, batch_cap=64,
                                     memory_fraction=0.5, slurm_job_id=1001)
    store.set_phase(instance, InstancePhase.READY, at=at(30))
    store.set_phase(instance, InstancePhase.READY, at=at(40))  # again: ready_at stays the first time
    (live,) = store.load_live_state().instances
    assert (live.phase, live.started_at, live.ready_at, live.slurm_job_id) == (InstancePhase.READY, at(0), at(30),
                                                                              1001)
    with pytest.raises(InvalidRecord, match=rf"^instance {instance}\.phase = 'loading' would go back from 'ready'$"):
        store.set_phase(instance, InstancePhase.LOADING, at=at(50))
    store.set_phase(instance, InstancePhase.STOPPED, at=at(90))
    assert store.load_live_state().instances == ()


def test_instance_on_gpus_of_two_nodes_is_refused(store: Store) -> None:
    gpus = make_cluster(store)
    with pytest.raises(InvalidRecord, match=r"span several nodes"):
        store.create_instance("llama-3.1-70b", [gpus[("n01", 0)], gpus[("n02", 0)]], at=at(0))
    with pytest.raises(InvalidRecord, match=r"\[999\] not known GPUs"):
        store.create_instance("llama-3.1-70b", [999], at=at(0))


def test_settings_and_migration_update_the_instance(store: Store) -> None:
    gpus = make_cluster(store)
    start = StartInstance("llama-3.1-70b", (gpus[("n01", 0)], gpus[("n01", 1)]), sm_pct=100, batch_cap=32)
    instance = store.create_instance_for(start, at=at(0), slurm_job_id=7, endpoint_url="http://n01:8000")
    store.apply_gpu_settings(gpus[("n01", 0)], GpuSettings(clock_mhz=1500, sm_pct={instance: 60.0},
                                                           batch_cap={instance: 48}))
    store.update_instance(instance, gpu_ids=[gpus[("n02", 0)], gpus[("n02", 1)]], slurm_job_id=8,
                          endpoint_url="http://n02:8000")
    state = store.load_live_state()
    (live,) = state.instances
    assert (live.gpus, live.sm_pct, live.batch_cap, live.slurm_job_id, live.endpoint_url) == (
        (gpus[("n02", 0)], gpus[("n02", 1)]), 60.0, 48, 8, "http://n02:8000")
    assert live.node_id == next(n.id for n in state.nodes if n.name == "n02")
    assert next(g for g in state.gpus if g.id == gpus[("n01", 0)]).clock_mhz == 1500


# -- the restart round trip ------------------------------------------------------------------------


def test_a_job_s_instance_is_the_one_linked_to_it_else_an_unlinked_one_its_comment_names(store: Store) -> None:
    gpu = make_cluster(store, nodes=1, gpus_per_node=1)[("n01", 0)]
    linked = store.create_instance("llama-3.1-8b", [gpu], at=T0, slurm_job_id=7)
    unlinked = store.create_instance("mistral-7b", [gpu], at=T0)
    jobs: dict[int, str | None] = {7: "adopted-label", 8: str(unlinked), 9: str(linked), 10: None, 11: "9" * 40}
    # 7: by its job id; 8: by id while nothing links the instance; 9 names job 7's instance: not believed.
    assert store.instances_of_jobs(jobs) == {7: linked, 8: unlinked}
    store.update_instance(unlinked, slurm_job_id=12)  # festinad links it to another job: 8's comment no longer counts
    assert store.instances_of_jobs(jobs) == {7: linked}
    assert store.instances_of_jobs({12: None, 13: str(unlinked)}) == {12: unlinked}
    with pytest.raises(InvalidRecord, match=r"job_id = -1"):
        store.instances_of_jobs({-1: None})


def test_live_state_survives_a_new_engine(store: Store, migrated: Engine) -> None:
    gpus = make_cluster(store)
    store.upsert_jobs([JobRecord(1001, "RUNNING", name="serve-8b", node_list="n01", gres="mps:50",
                                 start_at=at(1)), JobRecord(1002, "RUNNING", name="serve-70b", start_at=at(2)),
                       JobRecord(1003, "COMPLETED", end_at=at(9))])
    ready = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=at(0), sm_pct=50, batch_cap=64,
                                  memory_fraction=0.4, slurm_job_id=1001, endpoint_url="http://n01:8001")
    store.set_phase(ready, InstancePhase.READY, at=at(20))
    loading = store.create_instance("llama-3.1-70b", [gpus[("n02", 1)], gpus[("n02", 0)]], at=at(5),
                                    slurm_job_id=1002)
    stopped = store.create_instance("llama-3.1-8b", [gpus[("n01", 1)]], at=at(-10), slurm_job_id=1003)
    store.set_phase(stopped, InstancePhase.STOPPED, at=at(9))
    before = store.load_live_state()

    fresh = make_engine(migrated.url)  # what festinad does after a restart
    try:
        after = Store(fresh).load_live_state()
    finally:
        fresh.dispose()
    assert after == before
    assert [i.id for i in after.instances] == [ready, loading]  # oldest first, the stopped one left out
    first, second = after.instances
    assert (first.phase, first.sm_pct, first.batch_cap, first.memory_fraction, first.endpoint_url) == (
        InstancePhase.READY, 50.0, 64, 0.4, "http://n01:8001")
    assert second.gpus == (gpus[("n02", 1)], gpus[("n02", 0)])  # rank order, as placed
    assert first.started_at == at(0) and first.started_at.tzinfo is not None
    assert {j.job_id: j.state for j in after.jobs} == {1001: "RUNNING", 1002: "RUNNING"}
    assert next(j for j in after.jobs if j.job_id == 1001).start_at == at(1)
    assert len(after.nodes) == 2 and len(after.gpus) == 4


def test_times_come_back_as_the_same_instant_in_utc(store: Store, migrated: Engine) -> None:
    make_cluster(store)
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2026, 3, 1, 14, 0, 0, 123456, tzinfo=plus_two)
    store.record_requests([make_outcome(arrival_at=local, first_token_at=None, finish_at=None)])
    with migrated.connect() as connection:
        stored = connection.execute(select(RequestRecord.arrival_at)).scalar_one()
    assert stored == local and stored.utcoffset() == timedelta(0)
    assert stored == T0 + timedelta(microseconds=123456)


# -- batched records ---------------------------------------------------------------------------------


def _count_inserts(engine: Engine, table: str) -> Callable[[], int]:
    """How many INSERT statements into ``table`` went to the driver (an executemany counts once)."""
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(f"INSERT INTO {table.upper()}"):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    return lambda: len(seen)


def test_requests_are_recorded_in_one_batch(store: Store, migrated: Engine) -> None:
    gpus = make_cluster(store)
    instance = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=at(0))
    outcomes = [make_outcome(instance_id=instance, arrival_at=at(k * 0.01), first_token_at=at(k * 0.01 + 0.2),
                             finish_at=at(k * 0.01 + 3), slo_met=k % 10 != 0, external_id=f"req-{k}")
                for k in range(2000)]
    inserts = _count_inserts(migrated, "requests")
    assert store.record_requests(outcomes) == 2000
    assert inserts() <= 2  # one executemany (insertmanyvalues may split it into 1000-row pages)
    with migrated.connect() as connection:
        met = connection.execute(select(func.count()).where(RequestRecord.slo_met.is_(True))).scalar_one()
        last = connection.execute(select(RequestRecord).where(RequestRecord.external_id == "req-1999")).one()
    assert (met, _count(migrated, RequestRecord)) == (1800, 2000)
    assert (last.instance_id, last.arrival_at, last.ttft_s, last.user_name) == (instance, at(19.99), 0.2, "alice")


def test_energy_readings_and_shares_are_recorded_and_re_recording_is_a_no_op(store: Store, migrated: Engine) -> None:
    gpus = make_cluster(store)
    gpu = gpus[("n01", 0)]
    a = store.create_instance("llama-3.1-8b", [gpu], at=at(0), sm_pct=50, memory_fraction=0.5)
    b = store.create_instance("qwen-2.5-7b", [gpu], at=at(0), sm_pct=50, memory_fraction=0.5)
    readings = [EnergyReading(gpu, at(k), 1000.0 + 300.0 * k, 300.0, shares={a: 0.7, b: 0.3}) for k in range(100)]
    readings += [EnergyReading(gpus[("n02", 0)], at(k), 50.0 * k, 70.0) for k in range(100)]
    inserts = _count_inserts(migrated, "energy_samples")
    assert store.record_energy(readings) == 200
    assert inserts() <= 1
    assert store.record_energy(readings[:10]) == 10  # a watcher that re-reads after a restart
    assert (_count(migrated, EnergySample), _count(migrated, EnergySampleShare)) == (200, 200)
    store.set_instance_energy(a, 0.7 * 300.0 * 99, from_at=at(0), to_at=at(99))
    store.set_instance_energy(a, 0.7 * 300.0 * 100, from_at=at(0), to_at=at(100))  # totals are replaced


# -- bad input: refused whole, nothing stored lost -----------------------------------------------------


def test_negative_energy_is_refused_naming_field_and_value_and_nothing_is_stored(store: Store,
                                                                                   migrated: Engine) -> None:
    gpus = make_cluster(store)
    gpu = gpus[("n01", 0)]
    store.record_energy([EnergyReading(gpu, at(0), 100.0, 250.0)])
    batch = [EnergyReading(gpu, at(1), 350.0, 250.0), EnergyReading(gpu, at(2), -5.0, 250.0)]
    with pytest.raises(InvalidRecord) as info:
        store.record_energy(batch)
    assert str(info.value) == f"energy_samples[1] (gpu {gpu}).energy_counter_j = -5.0 must be non-negative"
    assert _count(migrated, EnergySample) == 1  # not the good first reading of the refused batch either


def test_a_batch_the_database_refuses_is_rolled_back_whole(store: Store, migrated: Engine) -> None:
    make_cluster(store)
    store.record_requests([make_outcome(external_id="kept")])
    with pytest.raises(DatabaseError) as info:
        store.record_requests([make_outcome(external_id="ok"), make_outcome(instance_id=424242)])  # no such instance
    message = str(info.value)
    assert message.startswith("database ") and ": record_requests refused: " in message and "\n" not in message
    with migrated.connect() as connection:
        assert connection.execute(select(RequestRecord.external_id)).scalars().all() == ["kept"]


@pytest.mark.parametrize(("case", "outcome", "expected"), [
    ("negative TTFT", dict(ttft_s=-0.5), "requests[1] (r1).ttft_s = -0.5 must be non-negative"),
    ("NaN TBT", dict(mean_tbt_s=float("nan")), "requests[1] (r1).mean_tbt_s = nan is not a finite number"),
    ("negative tokens", dict(output_tokens=-1), "requests[1] (r1).output_tokens = -1 must be non-negative"),
    ("float tokens", dict(prompt_tokens=1.5), "requests[1] (r1).prompt_tokens = 1.5 is not an integer"),
    ("naive time", dict(arrival_at=datetime(2026, 3, 1, 12)),
     "requests[1] (r1).arrival_at = datetime.datetime(2026, 3, 1, 12, 0) is not a timezone-aware datetime"),
    ("first token before arrival", dict(first_token_at=at(-1)),
     "requests[1] (r1).first_token_at = 2026-03-01T11:59:59+00:00 is before arrival_at = 2026-03-01T12:00:00+00:00"),
    ("empty model", dict(model=""), "requests[1] (r1).model = '' must not be empty"),
    ("slo_met not a bool", dict(slo_met="yes"), "requests[1] (r1).slo_met = 'yes' is not true or false"),
    ("outcome not text", dict(outcome=3), "requests[1] (r1).outcome = 3 is not text"),
])
def test_bad_request_outcome_is_refused_naming_field_and_value(store: Store, migrated: Engine, case: str,
                                                               outcome: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        store.record_requests([make_outcome(external_id="r0"), make_outcome(external_id="r1", **outcome)])
    assert str(info.value) == expected, case
    assert _count(migrated, RequestRecord) == 0


@pytest.mark.parametrize(("case", "call", "expected"), [
    ("SM share above 100", lambda s, g: s.create_instance("m", [g], at=T0, sm_pct=150),
     "instance.sm_pct = 150 must be in (0, 100]"),
    ("zero batch cap", lambda s, g: s.create_instance("m", [g], at=T0, batch_cap=0),
     "instance.batch_cap = 0 must be positive"),
    ("negative job energy", lambda s, g: s.set_job_energy(5, -1.0, from_at=T0, to_at=at(1)),
     "job_energy (job_id 5).energy_j = -1.0 must be non-negative"),
    ("negative Slurm energy", lambda s, g: s.upsert_jobs([JobRecord(5, "RUNNING", energy_j=-3.0)]),
     "slurm_jobs[0] (job 5).energy_j = -3.0 must be non-negative"),
    ("share above 1", lambda s, g: s.record_energy([EnergyReading(g, T0, 1.0, shares={1: 1.5})]),
     "energy_samples[0] (gpu 1).shares[1] = 1.5 must be in [0, 1]"),
    ("negative power", lambda s, g: s.upsert_gpus([GpuRecord("n01", 0, "h100-sxm-80gb", power_w=-1.0)]),
     "gpus[0].power_w = -1.0 must be non-negative"),
    ("zero clock", lambda s, g: s.apply_gpu_settings(g, GpuSettings(clock_mhz=0)),
     "gpu 1 settings.clock_mhz = 0 must be positive"),
])
def test_bad_values_are_refused_naming_field_and_value(store: Store, case: str, call: Callable[[Store, int], Any],
                                                       expected: str) -> None:
    gpus = make_cluster(store)
    assert gpus[("n01", 0)] == 1
    before = store.load_live_state()
    with pytest.raises(InvalidRecord) as info:
        call(store, gpus[("n01", 0)])
    assert str(info.value) == expected, case
    assert store.load_live_state() == before


def test_the_database_refuses_negative_energy_even_past_the_store(migrated: Engine) -> None:
    Store(migrated, clock=TickingClock()).upsert_nodes([NodeRecord("n01", "idle", True, 1)])
    store = Store(migrated, clock=TickingClock())
    (gpu,) = store.upsert_gpus([GpuRecord("n01", 0, "h100-sxm-80gb")]).values()
    with pytest.raises(IntegrityError), migrated.begin() as connection:
        connection.execute(insert(EnergySample), [{"gpu_id": gpu, "sampled_at": T0, "energy_counter_j": -1.0}])
    assert _count(migrated, EnergySample) == 0


# -- decisions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("action", "kind", "name"), [
    (Route(3), "placement", "route"),
    (Drop("no capacity"), "placement", "drop"),
    (StartInstance("m", (1,)), "scale", "start_instance"),
    (StopInstance(3), "scale", "stop_instance"),
    (Migrate(3, (2,)), "migration", "migrate"),
    (MoveQueued(3, 4, 5), "migration", "move_queued"),
    (PowerOff(1), "power", "power_off"),
    (PowerOn(1), "power", "power_on"),
    (GpuSettings(clock_mhz=1500), "setting", "gpu_settings"),
])
def test_every_action_has_a_decision_kind(action: Any, kind: str, name: str) -> None:
    row = decision_row(action, "why")
    assert (row["kind"], row["action"], row["reason"]) == (kind, name, "why")


def test_a_plan_is_recorded_one_decision_per_action_with_ids_filled_in(store: Store) -> None:
    gpus = make_cluster(store)
    nodes = {n.name: n.id for n in store.load_live_state().nodes}
    old = store.create_instance("llama-3.1-8b", [gpus[("n02", 0)]], at=at(0))
    plan = Plan((StartInstance("qwen-2.5-7b", (gpus[("n01", 1)],), sm_pct=40.0),
                 Migrate(old, (gpus[("n01", 0)],), sm_pct=60.0), StopInstance(old), PowerOff(nodes["n02"])),
                reason="consolidate: n02 fits on n01")
    ids = store.record_plan(plan, at=at(100))
    assert len(ids) == 4 and ids == sorted(ids)
    rows = store.decisions(since=at(100))
    assert [(r.kind, r.action) for r in rows] == [("scale", "start_instance"), ("migration", "migrate"),
                                                  ("scale", "stop_instance"), ("power", "power_off")]
    assert {r.reason for r in rows} == {"consolidate: n02 fits on n01"}
    start, move, stop, power = rows
    assert (start.model, start.gpu_id, start.node_id) == ("qwen-2.5-7b", gpus[("n01", 1)], nodes["n01"])
    assert start.details == {"model": "qwen-2.5-7b", "gpus": [gpus[("n01", 1)]], "sm_pct": 40.0, "batch_cap": 256,
                             "memory_fraction": 1.0, "evict": []}
    assert (move.instance_id, move.model, move.gpu_id, move.node_id) == (old, "llama-3.1-8b", gpus[("n01", 0)],
                                                                         nodes["n01"])
    assert (stop.instance_id, stop.gpu_id, stop.node_id) == (old, gpus[("n02", 0)], nodes["n02"])
    assert (power.node_id, power.instance_id, power.decided_at) == (nodes["n02"], None, at(100))
    assert [r.action for r in store.decisions(since=at(0), kind="power")] == ["power_off"]


def test_placements_and_settings_are_decisions_too(store: Store) -> None:
    gpus = make_cluster(store)
    instance = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=at(0))
    store.record_placement("llama-3.1-8b", Drop("every instance would miss its TTFT SLO"), at=at(1))
    store.record_placement("llama-3.1-8b", Route(instance), at=at(2), reason="least added energy")
    store.record_settings(gpus[("n01", 0)], GpuSettings(clock_mhz=1410, sm_pct={instance: 50.0}), at=at(3),
                          reason="decode-heavy: lower clock keeps TBT")
    drop, route, setting = store.decisions(since=at(0))
    assert (drop.action, drop.model, drop.reason) == ("drop", "llama-3.1-8b", "every instance would miss its TTFT SLO")
    assert (route.instance_id, route.gpu_id) == (instance, gpus[("n01", 0)])
    assert (setting.kind, setting.gpu_id, setting.details["sm_pct"]) == ("setting", gpus[("n01", 0)],
                                                                        {str(instance): 50.0})


def test_an_unchanged_decision_made_again_is_counted_on_its_row(store: Store) -> None:
    """The dev cluster's "power_off empty nodes" every 30 s for the same nodes: one row per node, counted."""
    make_cluster(store, nodes=3)
    nodes = {n.name: n.id for n in store.load_live_state().nodes}
    empty = Plan((PowerOff(nodes["n02"]), PowerOff(nodes["n03"])), reason="power_off empty nodes")
    first = store.record_plan(empty, at=at(100))
    store.record_placement("llama-3.1-8b", Drop("no capacity"), at=at(110))  # another target in between
    assert store.record_plan(empty, at=at(130)) == first
    assert store.record_plan(empty, at=at(160)) == first
    rows = store.decisions(since=at(0), kind="power")
    assert [(r.node_name, r.times_decided, r.decided_at, r.last_decided_at) for r in rows] == [
        ("n02", 3, at(100), at(160)), ("n03", 3, at(100), at(160))]
    assert len(store.decisions(since=at(0))) == 3


@pytest.mark.parametrize(("between", "again", "rows"), [
    ("power_on", PowerOff(0), 3),  # off, on, off: the state changed, so the third is a decision of its own
    (None, PowerOff(0), 1),  # off, off: counted
    (None, PowerOn(0), 2),  # another action for the node
])
def test_a_decision_is_counted_only_while_it_follows_the_same_one(store: Store, between: str | None,
                                                                  again: PowerOff | PowerOn, rows: int) -> None:
    make_cluster(store, nodes=1)
    node = store.load_live_state().nodes[0].id
    store.record_plan(Plan((PowerOff(node),), "empty"), at=at(1))
    if between == "power_on":
        store.record_plan(Plan((PowerOn(node),), "queued work"), at=at(2))
    store.record_plan(Plan((replace(again, node=node),), "empty"), at=at(3))
    assert len(store.decisions(since=at(0))) == rows


def test_a_changed_reason_or_setting_is_a_new_decision(store: Store) -> None:
    gpus = make_cluster(store, nodes=1)
    gpu = gpus[("n01", 0)]
    store.record_settings(gpu, GpuSettings(clock_mhz=1410), at=at(1), reason="decode-heavy")
    store.record_settings(gpu, GpuSettings(clock_mhz=1410), at=at(2), reason="decode-heavy")
    store.record_settings(gpu, GpuSettings(clock_mhz=1200), at=at(3), reason="decode-heavy")
    store.record_settings(gpu, GpuSettings(clock_mhz=1200), at=at(4), reason="idle")
    store.record_settings(gpus[("n01", 1)], GpuSettings(clock_mhz=1200), at=at(5), reason="idle")
    rows = store.decisions(since=at(0))
    assert [(r.gpu_index, r.details["clock_mhz"], r.reason, r.times_decided) for r in rows] == [
        (0, 1410, "decode-heavy", 2), (0, 1200, "decode-heavy", 1), (0, 1200, "idle", 1), (1, 1200, "idle", 1)]
    assert all(r.node_name == "n01" for r in rows)


def test_a_decision_made_again_after_since_is_listed(store: Store) -> None:
    make_cluster(store, nodes=1)
    node = store.load_live_state().nodes[0].id
    for seconds in (0, 30, 3600):
        store.record_plan(Plan((PowerOff(node),), "empty"), at=at(seconds))
    [row] = store.decisions(since=at(1800))
    assert (row.decided_at, row.last_decided_at, row.times_decided) == (at(0), at(3600), 3)


def test_a_decision_naming_a_node_that_is_gone_keeps_its_id(store: Store) -> None:
    store.record_plan(Plan((PowerOff(999),), "empty"), at=at(1))
    [row] = store.decisions(since=at(0))
    assert (row.node_id, row.node_name, row.gpu_index) == (999, None, None)


def test_a_failure_after_a_write_in_the_same_call_rolls_the_write_back(store: Store, migrated: Engine) -> None:
    gpus = make_cluster(store)
    instance = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=at(0))
    # the new job id is recorded (a PENDING row) before the placement is found bad
    with pytest.raises(InvalidRecord, match=rf"^instance {instance}\.gpu_ids = \[999\]"):
        store.update_instance(instance, slurm_job_id=99, gpu_ids=[999])
    assert _count(migrated, SlurmJob) == 0
    (live,) = store.load_live_state().instances
    assert (live.gpus, live.slurm_job_id) == ((gpus[("n01", 0)],), None)


def test_time_range_queries_compare_instants_whatever_the_offset_written(store: Store, migrated: Engine) -> None:
    make_cluster(store)
    tokyo, new_york = timezone(timedelta(hours=9)), timezone(timedelta(hours=-5))
    # written in three zones, out of order; as instants they are T0-1h, T0+10s, T0+2h
    store.record_requests([
        make_outcome(external_id="later", arrival_at=at(7200).astimezone(tokyo), first_token_at=None, finish_at=None),
        make_outcome(external_id="inside", arrival_at=at(10).astimezone(new_york), first_token_at=None,
                     finish_at=None),
        make_outcome(external_id="earlier", arrival_at=at(-3600).astimezone(tokyo), first_token_at=None,
                     finish_at=None),
    ])
    window = select(RequestRecord.external_id).where(RequestRecord.arrival_at >= T0.astimezone(new_york),
                                                     RequestRecord.arrival_at < at(3600))
    with migrated.connect() as connection:
        assert connection.execute(window).scalars().all() == ["inside"]
        ordered = connection.execute(select(RequestRecord.external_id).order_by(RequestRecord.arrival_at))
        assert ordered.scalars().all() == ["earlier", "inside", "later"]


def test_the_last_of_several_updates_in_one_batch_wins(store: Store) -> None:
    ids = store.upsert_nodes([NodeRecord("n01", "idle", True, 8), NodeRecord("n01", "mixed", True, 8),
                              NodeRecord("n02", "idle", False, 8)])
    assert set(ids) == {"n01", "n02"}
    store.upsert_jobs([JobRecord(7, "PENDING"), JobRecord(7, "RUNNING", start_at=at(1))])
    assert {n.name: n.state for n in store.load_live_state().nodes} == {"n01": "mixed", "n02": "idle"}


def _requests_and_tokens(engine: Engine) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
    with engine.connect() as connection:
        rows = connection.execute(select(RequestRecord.external_id, RequestRecord.outcome, RequestRecord.output_tokens)
                                  .order_by(RequestRecord.id)).all()
        left = connection.execute(select(RequestInFlight.external_id, RequestInFlight.output_tokens)).all()
        tokens = connection.execute(select(func.coalesce(func.sum(TenantTokensHourly.tokens), 0))).scalar_one()
    return [tuple(r) for r in rows], [tuple(r) for r in left], int(tokens)


def test_a_checkpoint_in_flight_is_replaced_by_its_final_row_and_charged_once(store: Store, migrated: Engine) -> None:
    gpus = make_cluster(store)
    instance = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=T0)
    running = dict(instance_id=instance, external_id="run1-1", outcome="in_flight", slo_met=False, finish_at=at(1.0))
    store.checkpoint_requests([make_outcome(output_tokens=10, **running)])
    store.checkpoint_requests([make_outcome(output_tokens=40, **running)])  # the next flush: replaces the first
    assert _requests_and_tokens(migrated) == ([], [("run1-1", 40)], 0)  # nothing charged while it runs
    store.record_requests([make_outcome(instance_id=instance, external_id="run1-1", outcome="ok", output_tokens=128),
                           make_outcome(instance_id=instance, outcome="ok", output_tokens=8)])
    assert _requests_and_tokens(migrated) == ([("run1-1", "ok", 128), (None, "ok", 8)], [], 2 * 512 + 128 + 8)
    assert store.close_requests_in_flight() == 0  # a clean stop leaves nothing to recover


def test_checkpoints_left_by_a_crash_become_requests_charged_with_their_tokens(store: Store, migrated: Engine) -> None:
    gpus = make_cluster(store)
    instance = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=T0)
    store.checkpoint_requests([make_outcome(instance_id=instance, external_id=f"run1-{k}", outcome="in_flight",
                                            slo_met=False, output_tokens=30 * k, finish_at=at(2.0)) for k in (1, 2)])
    assert store.close_requests_in_flight("gateway_crashed") == 2
    rows, left, tokens = _requests_and_tokens(migrated)
    assert sorted(rows) == [("run1-1", "gateway_crashed", 30), ("run1-2", "gateway_crashed", 60)] and left == []
    assert tokens == 2 * 512 + 30 + 60
    assert store.close_requests_in_flight() == 0  # once


def test_a_checkpoint_needs_its_request_id(store: Store) -> None:
    with pytest.raises(InvalidRecord) as info:
        store.checkpoint_requests([make_outcome(outcome="in_flight")])
    assert str(info.value) == "requests_in_flight[0].external_id = None is not text"
