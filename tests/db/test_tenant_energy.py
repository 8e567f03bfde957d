"""Energy per gateway tenant, account and user on SQLite and PostgreSQL: two tenants sharing one GPU are
charged by the tokens their requests took, to the joule, and their energies sum to the GPU's; an instance's
Slurm job (festinad's own, svc/festina) is charged only for the hour it served no one.

One GPU (n01/0) holds instance A (llama-3.1-8b, Slurm job 201 of svc/festina) and B (mistral-7b, job
202). Readings (counter in J) and the difference each closes:

- T0 12:00 1000; 12:30 4600 (3600 J in hour 12: A 75 % = 2700 J, B 25 % = 900 J);
- 13:30 8600 (4000 J in hour 13: A 100 %); 14:30 9600 (1000 J in hour 14: A 100 %, no requests).

Requests (prompt + output tokens): hour 12 on A alice/proj1 300, bob/proj2 100; on B bob 200.
Hour 13 on A alice 500, bob 300. So hour 12: alice 2700 * 300/400 = 2025 J, bob 675 + 900 = 1575 J;
hour 13: alice 4000 * 500/800 = 2500 J, bob 1500 J. Over 12:00-14:00 alice 4525 J + bob 3075 J =
7600 J, the GPU's energy. Hour 14 A served nobody: its 1000 J go to its job's svc/festina.
``--by account`` and ``--by user`` are the same split summed per account and per user.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from festina_hpc.daemon.auth import DbEnergyUsage
from festina_hpc.db.accounting import run_query
from festina_hpc.db.models import ModelInstance, RequestRecord
from festina_hpc.db.store import EnergyReading, JobRecord, RequestOutcome, Store
from tests.db.conftest import make_cluster

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def request(instance: int, minutes: float, tokens: int, user: str, account: str, key: int | None) -> RequestOutcome:
    return RequestOutcome("llama-3.1-8b", at(minutes), tokens // 2, tokens - tokens // 2, slo_met=True,
                          instance_id=instance, user_name=user, account=account, api_key_id=key)


@pytest.fixture
def shared_gpu(store: Store, migrated: Engine) -> Engine:
    gpu = make_cluster(store, nodes=1, gpus_per_node=1)[("n01", 0)]
    store.upsert_jobs([JobRecord(201, "RUNNING", user_name="festina", account="svc", start_at=T0),
                       JobRecord(202, "RUNNING", user_name="festina", account="svc", start_at=T0)])
    a = store.create_instance("llama-3.1-8b", [gpu], at=T0, sm_pct=50, memory_fraction=0.5, slurm_job_id=201)
    b = store.create_instance("mistral-7b", [gpu], at=T0, sm_pct=50, memory_fraction=0.5, slurm_job_id=202)
    store.record_requests([
        request(a, 5, 200, "alice", "proj1", 1), request(a, 6, 100, "alice", "proj1", 1),
        request(a, 7, 100, "bob", "proj2", 2), request(b, 8, 200, "bob", "proj2", 2),
        request(a, 70, 500, "alice", "proj1", 1), request(a, 71, 300, "bob", "proj2", 2),
    ])
    store.record_energy([
        EnergyReading(gpu, T0, 1000.0), EnergyReading(gpu, at(30), 4600.0, shares={a: 0.75, b: 0.25}),
        EnergyReading(gpu, at(90), 8600.0, shares={a: 1.0}), EnergyReading(gpu, at(150), 9600.0, shares={a: 1.0}),
    ])
    return migrated


def tenants(engine: Engine, **params: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["account"], r["user_name"]): r for r in run_query(engine, "energy_by_tenant", **params).as_dicts()}


def test_two_tenants_on_one_gpu_split_its_energy_by_tokens(shared_gpu: Engine) -> None:
    got = tenants(shared_gpu, since=T0, until=at(120))
    assert set(got) == {("proj1", "alice"), ("proj2", "bob")}
    assert got[("proj1", "alice")]["energy_j"] == pytest.approx(4525.0, abs=1e-9)
    assert got[("proj2", "bob")]["energy_j"] == pytest.approx(3075.0, abs=1e-9)
    assert sum(r["energy_j"] for r in got.values()) == pytest.approx(7600.0, abs=1e-9)  # the GPU's energy
    assert (got[("proj1", "alice")]["requests"], got[("proj1", "alice")]["tokens"]) == (3, 800)
    assert (got[("proj2", "bob")]["requests"], got[("proj2", "bob")]["tokens"]) == (3, 600)
    assert got[("proj1", "alice")]["energy_per_token_j"] == pytest.approx(4525.0 / 800)


def test_an_hour_with_no_requests_goes_to_the_serving_job_account(shared_gpu: Engine) -> None:
    got = tenants(shared_gpu)
    assert got[("svc", "festina")]["energy_j"] == pytest.approx(1000.0)
    assert sum(r["energy_j"] for r in got.values()) == pytest.approx(8600.0)  # all of the GPU's energy
    only_hour_13 = tenants(shared_gpu, since=at(60), until=at(120))
    assert {k: round(v["energy_j"], 6) for k, v in only_hour_13.items()} == {("proj1", "alice"): 2500.0,
                                                                              ("proj2", "bob"): 1500.0}


def by(engine: Engine, name: str, key: str, **params: Any) -> dict[str, dict[str, Any]]:
    rows = run_query(engine, name, **params).as_dicts()
    assert len({r[key] for r in rows}) == len(rows), f"{name}: one row per {key}"
    return {r[key]: r for r in rows}


def test_gateway_accounts_on_a_shared_instance_are_charged_by_tokens(shared_gpu: Engine) -> None:
    """The serving jobs are festinad's (svc): the accounts and users that sent the requests are charged."""
    accounts = by(shared_gpu, "energy_by_account", "account", since=T0, until=at(120))
    assert {k: (r["requests"], r["tokens"]) for k, r in accounts.items()} == {"proj1": (3, 800), "proj2": (3, 600)}
    assert {k: r["energy_j"] for k, r in accounts.items()} == pytest.approx({"proj1": 4525.0, "proj2": 3075.0},
                                                                           abs=1e-9)
    assert accounts["proj2"]["energy_per_token_j"] == pytest.approx(3075.0 / 600)
    users = by(shared_gpu, "energy_by_user", "user_name", since=T0, until=at(120))
    assert {k: (r["accounts"], r["requests"], r["tokens"]) for k, r in users.items()} == {
        "alice": (1, 3, 800), "bob": (1, 3, 600)}
    assert {k: r["energy_j"] for k, r in users.items()} == pytest.approx({"alice": 4525.0, "bob": 3075.0}, abs=1e-9)
    # Hour 13 alone: A's 4000 J split 500 : 300 by tokens.
    hour_13 = by(shared_gpu, "energy_by_account", "account", since=at(60), until=at(120))
    assert {k: r["energy_j"] for k, r in hour_13.items()} == pytest.approx({"proj1": 2500.0, "proj2": 1500.0})


def test_an_hour_without_requests_goes_to_the_slurm_job_account_and_user(shared_gpu: Engine) -> None:
    accounts = by(shared_gpu, "energy_by_account", "account")
    assert {k: r["energy_j"] for k, r in accounts.items()} == pytest.approx(
        {"proj1": 4525.0, "proj2": 3075.0, "svc": 1000.0})
    assert (accounts["svc"]["requests"], accounts["svc"]["tokens"], accounts["svc"]["energy_per_token_j"]) == (
        0, 0, None)
    users = by(shared_gpu, "energy_by_user", "user_name")
    assert {k: r["energy_j"] for k, r in users.items()} == pytest.approx(
        {"alice": 4525.0, "bob": 3075.0, "festina": 1000.0})
    # Every joule of the GPU (no idle here: the instances' shares fill it) is charged once.
    for rows in (accounts, users, tenants(shared_gpu)):
        assert sum(r["energy_j"] for r in rows.values()) == pytest.approx(8600.0)
    assert list(accounts) == ["proj1", "proj2", "svc"]  # largest first


def test_a_user_under_two_accounts_is_one_row_of_user_and_split_by_account(store: Store, shared_gpu: Engine) -> None:
    with shared_gpu.connect() as connection:
        b = connection.execute(select(ModelInstance.id).where(ModelInstance.model == "mistral-7b")).scalar_one()
    # bob also sends 200 tokens to B in hour 12 with a key of proj1: B's 900 J split 200 : 200 between his accounts.
    store.record_requests([request(b, 9, 200, "bob", "proj1", 3)])
    accounts = by(shared_gpu, "energy_by_account", "account", since=T0, until=at(120))
    assert {k: r["energy_j"] for k, r in accounts.items()} == pytest.approx({"proj1": 4975.0, "proj2": 2625.0})
    users = by(shared_gpu, "energy_by_user", "user_name", since=T0, until=at(120))
    assert {k: (r["accounts"], r["requests"], r["tokens"]) for k, r in users.items()} == {
        "alice": (1, 3, 800), "bob": (2, 4, 800)}
    assert {k: r["energy_j"] for k, r in users.items()} == pytest.approx({"alice": 4525.0, "bob": 3075.0})
    got = tenants(shared_gpu, since=T0, until=at(120))
    assert got[("proj1", "bob")]["energy_j"] == pytest.approx(450.0)


def test_requests_keep_their_key(shared_gpu: Engine) -> None:
    with shared_gpu.connect() as connection:
        keys = connection.execute(select(RequestRecord.account, RequestRecord.api_key_id)).all()
    assert {(account, key) for account, key in keys} == {("proj1", 1), ("proj2", 2)}


def test_quota_usage_reads_the_tenant_split(shared_gpu: Engine) -> None:
    used = DbEnergyUsage(shared_gpu).energy_by_account_j(T0)
    assert used == pytest.approx({"proj1": 4525.0, "proj2": 3075.0, "svc": 1000.0})
    assert DbEnergyUsage(shared_gpu).energy_by_account_j(at(24 * 60)) == {}
