"""Live energy attribution into the database, on SQLite and PostgreSQL: a NodeAgent on simulated GPUs writes
through the real DbEnergySink into a real Store, and every ``festina energy report`` adds up.

Two jobs of two users, accounts and models share GPU 0 of node n1 at different SM shares, as festinad starts
them: job 301 (alice/proj1, llama-3.1-8b, 60 %) names its instance by id in its comment and is linked to it;
job 302 (bob/proj2, mistral-7b, 30 %) is a user's own festina job that festinad adopted (its comment's
label is not an id). The node ticks across an hour boundary, the jobs end one after the other, the GPUs
idle. Every report is then non-empty and the sum over jobs (models, users, accounts, tenants) plus the idle
energy is the GPUs' counters, within 1 %. The quota test drives the gateway: an account whose requests'
live-attributed energy crosses its daily quota gets 429 with Retry-After until the next UTC day.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from festina_hpc.daemon.auth import AuthConfig, Authenticator, DbEnergyUsage, MemoryKeys
from festina_hpc.daemon.bench import stub_upstream
from festina_hpc.daemon.gateway import Gateway, GatewayConfig, GatewayModel
from festina_hpc.daemon.records import MemoryRecorder
from festina_hpc.daemon.routing import Endpoint
from festina_hpc.db.store import GpuRecord, JobRecord, NodeRecord, RequestOutcome, Store
from festina_hpc.gpu.simulated import ManualClock
from festina_hpc.node.agent import JobEnergy, NodeAgent
from festina_hpc.node.config import NodeConfig, NodePaths
from festina_hpc.node.db_sink import DbEnergySink
from festina_hpc.node.hookenv import Directives, JobContext
from festina_hpc.node.main import _simulated_workloads
from festina_hpc.node.simulated import PersistentSimulatedGpu, PersistentSimulatedMps
from festina_hpc.node.state import StateFile
from festina_hpc.policy.types import Slo
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.server import running_app
from tests.cli.conftest import Festina, festina  # noqa: F401
from tests.conftest import REPO_PROFILES
from tests.db.conftest import backend, db_url, engine, migrated, postgres_url  # noqa: F401

GPU_TYPE = "h100-sxm-80gb"
LLAMA, MISTRAL = "llama-3.1-8b", "mistral-7b"
START_S = datetime(2026, 3, 1, 12, 50, tzinfo=UTC).timestamp()  # ten minutes before an hour boundary
TICK_S = 30.0


@dataclass
class LiveNode:
    agent: NodeAgent
    gpu: PersistentSimulatedGpu
    clock: ManualClock
    store: Store  # festinad's view of the same database
    gpu_ids: dict[int, int]  # GPU index -> database id

    def ticks(self, count: int) -> None:
        for _ in range(count):
            self.clock.advance(TICK_S)
            self.agent.control_tick()

    def counters_j(self) -> float:
        return sum(self.gpu.energy_j(i) for i in range(self.gpu.device_count()))


@pytest.fixture
def live(tmp_path: Path, migrated: Engine) -> Iterator[LiveNode]:  # noqa: F811
    """Node n1 with two simulated H100s whose festina-node writes into the database through DbEnergySink."""
    paths = NodePaths.of(NodeConfig(state_dir=str(tmp_path / "state")), "n1")
    clock = ManualClock(START_S)
    profiles = ProfileStore(REPO_PROFILES)
    gpu = PersistentSimulatedGpu(paths.simulated_file, profiles, GPU_TYPE, 2, clock)
    mps = PersistentSimulatedMps(paths.node_dir / "simulated-mps.json", 2)
    store = Store(migrated)
    # festinad's watcher has seen the node and its GPUs (the sink would create them otherwise).
    store.upsert_nodes([NodeRecord("n1", "mixed", True, 2)])
    gpu_ids = {index: gpu_id for (_, index), gpu_id in
               store.upsert_gpus([GpuRecord("n1", i, GPU_TYPE) for i in range(2)]).items()}
    agent = NodeAgent("n1", gpu, mps, StateFile(paths.state_file, paths.lock_file), paths,
                      sink=DbEnergySink(Store(migrated), GPU_TYPE, 2),
                      jobs_changed=_simulated_workloads(gpu, profiles, LLAMA), clock=clock)
    yield LiveNode(agent, gpu, clock, store, gpu_ids)
    for index in range(2):
        mps.stop(index)


def job(job_id: int, user: str, model: str, instance: str, mps_pct: int) -> JobContext:
    return JobContext(job_id, 1000, user, "n1", (0,), mps_pct, Directives(model, instance))


def start_festinad_job(live: LiveNode, job_id: int, user: str, account: str, model: str, sm_pct: int) -> int:
    """What festinad does: record the instance, sbatch with its id in the comment, link the job, watch it."""
    instance_id = live.store.create_instance(model, [live.gpu_ids[0]], at=_at(live), sm_pct=sm_pct)
    live.store.update_instance(instance_id, slurm_job_id=job_id)
    live.store.upsert_jobs([JobRecord(job_id, "RUNNING", user_name=user, account=account, start_at=_at(live))])
    return instance_id


def adopt_job(live: LiveNode, job_id: int, user: str, account: str, model: str, sm_pct: int) -> int:
    """A user's own festina job (label, not an id) that festinad's reconcile adopted."""
    live.store.upsert_jobs([JobRecord(job_id, "RUNNING", user_name=user, account=account, start_at=_at(live))])
    return live.store.create_instance(model, [live.gpu_ids[0]], at=_at(live), sm_pct=sm_pct, slurm_job_id=job_id)


def _at(live: LiveNode) -> datetime:
    return datetime.fromtimestamp(live.clock(), UTC)


def run_two_jobs(live: LiveNode) -> tuple[float, JobEnergy, JobEnergy]:
    """Idle, job 301, job 301 + 302 across the hour, 302 alone, idle; returns (counters' delta, 301's, 302's)."""
    live.agent.control_tick()  # the first readings: the database's cursors
    first_j = live.counters_j()
    live.ticks(2)  # idle
    a = start_festinad_job(live, 301, "alice", "proj1", LLAMA, 60)
    live.agent.prolog(job(301, "alice", LLAMA, str(a), 60))
    live.ticks(4)
    adopt_job(live, 302, "bob", "proj2", MISTRAL, 30)
    live.agent.prolog(job(302, "bob", MISTRAL, "bobs-run", 30))
    live.ticks(20)  # ten minutes: past 13:00
    ended_a = live.agent.epilog(job(301, "alice", LLAMA, str(a), 60))
    live.ticks(6)
    ended_b = live.agent.epilog(job(302, "bob", MISTRAL, "bobs-run", 30))
    live.ticks(3)  # idle again
    assert ended_a is not None and ended_b is not None
    return live.counters_j() - first_j, ended_a, ended_b


def report(festina: Festina, url: str, by: str) -> list[dict[str, Any]]:  # noqa: F811
    result = festina("energy", "report", "--by", by, "--format", "json", "--db-url", url)
    assert (result.code, result.err) == (0, ""), result.err
    rows: list[dict[str, Any]] = json.loads(result.out)["rows"]
    assert rows, f"--by {by} is empty"
    return rows


def total(rows: list[dict[str, Any]]) -> float:
    return sum(float(r["energy_j"]) for r in rows)


def test_every_report_adds_up_to_the_node_counters(live: LiveNode, festina: Festina, db_url: URL,  # noqa: F811
                                                    tmp_path: Path) -> None:
    counters_j, ended_a, ended_b = run_two_jobs(live)
    url = db_url.render_as_string(hide_password=False)
    node = report(festina, url, "node")
    assert [r["node"] for r in node] == ["n1"]
    node_j, idle_j = float(node[0]["energy_j"]), float(node[0]["idle_energy_j"])
    assert node_j == pytest.approx(counters_j, rel=0.01)
    assert 0 < idle_j < 0.5 * node_j  # the idle minutes and GPU 1, never a job's time
    attributed_j = node_j - idle_j

    jobs = {r["job_id"]: r for r in report(festina, url, "job")}
    assert {j: (r["user_name"], r["account"]) for j, r in jobs.items()} == {301: ("alice", "proj1"),
                                                                          302: ("bob", "proj2")}
    assert total(list(jobs.values())) == pytest.approx(attributed_j, rel=0.01)
    # The database's split is the node's: each job's total is what its epilog measured.
    assert jobs[301]["energy_j"] == pytest.approx(ended_a.energy_j, rel=0.01)
    assert jobs[302]["energy_j"] == pytest.approx(ended_b.energy_j, rel=0.01)
    assert jobs[301]["energy_j"] > jobs[302]["energy_j"] > 0  # a larger share for longer

    models = {r["model"]: float(r["energy_j"]) for r in report(festina, url, "model")}
    assert models == pytest.approx({LLAMA: jobs[301]["energy_j"], MISTRAL: jobs[302]["energy_j"]}, rel=0.01)
    # No requests: each instance's hours are charged to its job's user and account (--by user, account, tenant).
    user_rows = report(festina, url, "user")
    users = {r["user_name"]: float(r["energy_j"]) for r in user_rows}
    assert len(users) == len(user_rows) and all(r["accounts"] == 1 for r in user_rows)
    assert users == pytest.approx({"alice": jobs[301]["energy_j"], "bob": jobs[302]["energy_j"]}, rel=0.01)
    account_rows = report(festina, url, "account")
    accounts = {r["account"]: float(r["energy_j"]) for r in account_rows}
    assert len(accounts) == len(account_rows)  # one row per account, over the whole range
    assert accounts == pytest.approx({"proj1": jobs[301]["energy_j"], "proj2": jobs[302]["energy_j"]}, rel=0.01)
    tenants = {(r["account"], r["user_name"]): float(r["energy_j"]) for r in report(festina, url, "tenant")}
    assert tenants == pytest.approx({("proj1", "alice"): jobs[301]["energy_j"],
                                     ("proj2", "bob"): jobs[302]["energy_j"]}, rel=0.01)
    days = report(festina, url, "day")
    assert len(days) == 1
    assert (days[0]["energy_j"], days[0]["attributed_energy_j"], days[0]["idle_energy_j"]) == pytest.approx(
        (node_j, attributed_j, idle_j), rel=0.01)
    for rows in (list(jobs.values()), report(festina, url, "model"), user_rows, account_rows,
                 report(festina, url, "tenant")):
        assert total(rows) + idle_j == pytest.approx(node_j, rel=0.01)

    out = tmp_path / "models.png"
    plotted = festina("energy", "plot", "--what", "model", "--out", str(out), "--db-url", url)
    assert (plotted.code, plotted.err) == (0, ""), plotted.err
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_job_without_an_instance_is_idle_energy_logged_once(
        live: LiveNode, festina: Festina, db_url: URL, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    live.agent.control_tick()
    first_j = live.counters_j()
    a = start_festinad_job(live, 301, "alice", "proj1", LLAMA, 50)
    live.agent.prolog(job(301, "alice", LLAMA, str(a), 50))
    # Job 302's comment names instance a, which is job 301's: not believed. Job 303's names none the database has.
    live.agent.prolog(job(302, "mallory", MISTRAL, str(a), 25))
    with caplog.at_level(logging.WARNING, logger="festina_hpc.node.db_sink"):
        live.agent.prolog(job(303, "carol", MISTRAL, "99999", 25))
        live.ticks(10)
    unknown = [r.getMessage() for r in caplog.records if "no festina instance" in r.getMessage()]
    assert len(unknown) == 2 and any("job 302" in m for m in unknown) and any("job 303" in m for m in unknown)
    for job_id, instance in ((303, "99999"), (302, str(a)), (301, str(a))):
        live.agent.epilog(job(job_id, "x", MISTRAL, instance, 25))
    counters_j = live.counters_j() - first_j
    url = db_url.render_as_string(hide_password=False)
    node = report(festina, url, "node")[0]
    jobs = report(festina, url, "job")
    assert [r["job_id"] for r in jobs] == [301]
    assert float(node["energy_j"]) == pytest.approx(counters_j, rel=0.01)
    # 301's half of the shared intervals is charged; the other two jobs' halves are the GPUs' idle energy.
    assert total(jobs) + float(node["idle_energy_j"]) == pytest.approx(float(node["energy_j"]), rel=0.01)
    assert {r["model"] for r in report(festina, url, "model")} == {LLAMA}


MODELS = [GatewayModel(LLAMA, Slo(ttft_s=5.0, tbt_s=5.0))]


class OneInstance:
    """Routes every request to one upstream, as instance ``instance_id``."""

    def __init__(self, instance_id: int) -> None:
        self.url = ""
        self.instance_id = instance_id

    async def route(self, model: str, prompt_tokens: int) -> Endpoint:
        return Endpoint(self.url, instance_id=self.instance_id)

    def done(self, endpoint: Endpoint) -> None:
        pass


def test_an_account_over_its_quota_from_live_energy_gets_429_until_the_next_day(live: LiveNode,
                                                                                migrated: Engine) -> None:  # noqa: F811
    """alice/proj1 sends requests to an instance of festinad's (job of svc/festina); the node's live split
    charges its energy to her account by tokens (the tenant split, which quotas read). Under the quota at
    first, her requests are served; once the GPU's energy of the hour passes it, they get 429."""
    live.agent.control_tick()
    a = start_festinad_job(live, 401, "festina", "svc", LLAMA, 100)
    live.agent.prolog(job(401, "festina", LLAMA, str(a), 100))
    keys = MemoryKeys()
    alice, bob = keys.add("alice", "proj1"), keys.add("bob", "proj2")
    quota_j = 50_000.0
    wall_s = [live.clock()]
    router = OneInstance(a)

    def served_by_a(user: str, account: str) -> None:
        # What festinad's recorder stores of each request the gateway served (the tenant split reads it).
        live.store.record_requests([RequestOutcome(LLAMA, _at(live), 100, 100, slo_met=True, instance_id=a,
                                                   user_name=user, account=account)])

    async def main() -> list[tuple[int, str | None]]:
        statuses: list[tuple[int, str | None]] = []
        async with running_app(stub_upstream(4)) as upstream:
            router.url = upstream
            auth = Authenticator(keys, AuthConfig(key_cache_ttl_s=0.0, quota_refresh_s=0.0,
                                                  account_energy_quota_j_per_day={"proj1": quota_j}),
                                 DbEnergyUsage(migrated), wall_clock=lambda: wall_s[0])
            gateway = Gateway(router, MemoryRecorder(), MODELS, GatewayConfig(scale_timeout_s=5.0), auth=auth)
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                async def post(token: str) -> None:
                    async with session.post(f"{gw}/v1/completions", headers={"Authorization": f"Bearer {token}"},
                                            json={"model": LLAMA, "prompt": "hi", "max_tokens": 4}) as resp:
                        statuses.append((resp.status, resp.headers.get("Retry-After")))

                for _ in range(40):  # a request every tick until the quota bites
                    await asyncio.to_thread(live.ticks, 1)
                    wall_s[0] = live.clock()
                    await post(alice)
                    if statuses[-1][0] == 429:
                        break
                    await asyncio.to_thread(served_by_a, "alice", "proj1")
                await post(bob)  # proj2 has no quota and was charged nothing
                wall_s[0] = (wall_s[0] // 86_400 + 1) * 86_400  # the next UTC day: a new budget
                await post(alice)
        return statuses

    statuses = asyncio.run(main())
    refused_at_s = live.clock()  # no tick after the refusal
    used = DbEnergyUsage(migrated).energy_by_account_j(datetime.fromtimestamp(START_S // 86_400 * 86_400, UTC))
    assert used["proj1"] >= quota_j and "proj2" not in used
    *alice_before, refused, bob_served, next_day = statuses
    assert len(alice_before) >= 2 and all(status == (200, None) for status in alice_before)
    assert refused == (429, str(math.ceil((START_S // 86_400 + 1) * 86_400 - refused_at_s)))  # until 00:00 UTC
    assert bob_served == (200, None) and next_day == (200, None)
