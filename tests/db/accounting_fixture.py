"""A small cluster's energy readings and requests whose accounting answers are worked out by hand.

Two nodes (n01, n02) of two H100s each; jobs 101 (alice, proj1) and 102 (bob, proj2); instances
A (llama-3.1-8b, job 101) and B (mistral-7b, job 102) share n01's GPU 0, C (llama-3.1-8b, job 102)
runs on n02's GPU 0; n02's GPU 1 has no instance. T0 is 2026-03-01 12:00 UTC.

Readings (counter in J), and the difference each closes:

- n01/0: T0 1000; T0+30 min 4600 (3600 J: A 50 %, B 25 %, 25 % idle); 13:01 11800 (7200 J: A 100 %)
- n02/0: T0 50; T0+10 min 650 (600 J: C 50 %, 50 % idle); next day 12:00 100 (the driver restarted
  the counter: 100 J, C 100 %)
- n02/1: T0 0; T0+1 min 1200 (1200 J, idle)

So: A 1800 + 7200 = 9000 J, B 900 J, C 300 + 100 = 400 J; job 101 = 9000 J, job 102 = 1300 J;
llama-3.1-8b 2100 J in 12:00, 7200 J in 13:00 and 100 J the next day at 12:00; mistral-7b 900 J in
12:00; n01 3600 J (900 idle) in 12:00 and 7200 J in 13:00; n02 1800 J (1500 idle) in 12:00 and
100 J the next day. 12700 J in all, 2400 J of it idle.

Requests: llama-3.1-8b 4 on day one (50 prompt + 100 output tokens each, 3 met their SLOs) and 1 on
day two (30 + 70, missed); mistral-7b 2 on day one (100 + 150 each, both met).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from festina_hpc.db.store import EnergyReading, JobRecord, RequestOutcome, Store
from tests.db.conftest import make_cluster

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY1 = datetime(2026, 3, 1, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def build(store: Store) -> tuple[dict[str, int], list[EnergyReading]]:
    """The cluster, jobs, instances and requests; returns the instance ids and the readings (not yet recorded)."""
    gpus = make_cluster(store)
    store.upsert_jobs([JobRecord(101, "RUNNING", user_name="alice", account="proj1", start_at=T0),
                       JobRecord(102, "RUNNING", user_name="bob", account="proj2", start_at=T0)])
    a = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=T0, sm_pct=50, memory_fraction=0.5,
                              slurm_job_id=101)
    b = store.create_instance("mistral-7b", [gpus[("n01", 0)]], at=T0, sm_pct=50, memory_fraction=0.5,
                              slurm_job_id=102)
    c = store.create_instance("llama-3.1-8b", [gpus[("n02", 0)]], at=T0, slurm_job_id=102)
    g1, g3, g4 = gpus[("n01", 0)], gpus[("n02", 0)], gpus[("n02", 1)]
    readings = [
        EnergyReading(g1, T0, 1000.0, 300.0),
        EnergyReading(g1, at(1800), 4600.0, 300.0, shares={a: 0.5, b: 0.25}),
        EnergyReading(g1, at(3660), 11800.0, 400.0, shares={a: 1.0}),
        EnergyReading(g3, T0, 50.0, 100.0),
        EnergyReading(g3, at(600), 650.0, 100.0, shares={c: 0.5}),
        EnergyReading(g3, at(86400), 100.0, 90.0, shares={c: 1.0}),
        EnergyReading(g4, T0, 0.0, 20.0),
        EnergyReading(g4, at(60), 1200.0, 20.0),
    ]
    outcomes = [RequestOutcome("llama-3.1-8b", at(10 * k), 50, 100, slo_met=k < 3, instance_id=a, ttft_s=0.1 * (k + 1),
                               user_name="alice", account="proj1") for k in range(4)]
    outcomes.append(RequestOutcome("llama-3.1-8b", at(86400 + 5), 30, 70, slo_met=False, instance_id=c, ttft_s=2.0,
                                   user_name="bob", account="proj2"))
    outcomes += [RequestOutcome("mistral-7b", at(20 + k), 100, 150, slo_met=True, instance_id=b, ttft_s=0.3,
                                user_name="bob", account="proj2") for k in range(2)]
    store.record_requests(outcomes)
    return {"A": a, "B": b, "C": c}, readings


def load(store: Store) -> dict[str, int]:
    """``build`` and record the readings; returns the instance ids."""
    instances, readings = build(store)
    store.record_energy(readings)
    return instances


H12, H13, H12_NEXT = T0, at(3600), at(86400)

JOB_ENERGY_J = {101: 9000.0, 102: 1300.0}
INSTANCE_ENERGY_J = {"A": 9000.0, "B": 900.0, "C": 400.0}
MODEL_HOUR_J = {("llama-3.1-8b", H12): 2100.0, ("llama-3.1-8b", H13): 7200.0, ("llama-3.1-8b", H12_NEXT): 100.0,
                ("mistral-7b", H12): 900.0}
ACCOUNT_DAY_J = {("proj1", "alice", DAY1): 9000.0, ("proj2", "bob", DAY1): 1200.0, ("proj2", "bob", DAY2): 100.0}
# (node, hour) -> (energy_j, idle_energy_j)
NODE_HOUR_J = {("n01", H12): (3600.0, 900.0), ("n01", H13): (7200.0, 0.0), ("n02", H12): (1800.0, 1500.0),
               ("n02", H12_NEXT): (100.0, 0.0)}
TOTAL_J, IDLE_J = 12700.0, 2400.0
