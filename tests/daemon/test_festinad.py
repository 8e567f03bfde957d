"""festinad's core against a fake Slurm: starts, failures with retry, a node that disappears, restart, adoption.

The fake ``SlurmClient`` (a boundary fake: the real cluster is tested in
test_e2e_slurm.py) "runs" a serving job by starting an in-process emulated
server on the job's port, so festinad's real path (submit, poll /health,
proxy) runs unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import stat
import tempfile
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from festina_hpc.daemon.auth import AuthConfig, Authenticator
from festina_hpc.daemon.festinad import (
    Festinad,
    FestinadSettings,
    ModelOptions,
    SlurmRetry,
    StoreRecorder,
    parse_comment,
)
from festina_hpc.daemon.gateway import Gateway, gateway_models
from festina_hpc.db import migrate
from festina_hpc.db.accounting import run_query
from festina_hpc.db.engine import make_engine
from festina_hpc.db.keys import KeyRing
from festina_hpc.db.store import EnergyReading, Store
from festina_hpc.policy.base import PolicyContext, make_policy
from festina_hpc.policy.types import InstancePhase, ModelLimits, Plan, PowerOff, PowerOn, StartInstance, StopInstance
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.engine import SimulatedEngine
from festina_hpc.serve.secret import read_secret_file, write_secret
from festina_hpc.serve.server import make_app, running_app
from festina_hpc.slurm.errors import SlurmCommandError
from festina_hpc.slurm.sbatch import render_script
from festina_hpc.slurm.types import Gres, ServingJobSpec, SlurmJob, SlurmNode

GPU = "h100-sxm-80gb"
MODELS = ("llama-3.1-8b", "mistral-7b")


class FakeSlurm:
    """Jobs start at once as in-process servers; ``fail_next`` makes the next calls raise (a failing sbatch)."""

    def __init__(self, store: ProfileStore, nodes: Sequence[str] = ("n1", "n2")):
        self.store = store
        self.nodes = list(nodes)
        self.jobs: dict[int, SlurmJob] = {}
        self.ids = itertools.count(100)
        self.fail_next = 0
        self.calls: list[str] = []
        self.started: list[tuple[ServingJobSpec, int]] = []
        self.cancelled: list[int] = []
        # The cluster's shared filesystem (festinad's secret_dir lives there, as on a real cluster).
        self.shared_dir = Path(tempfile.mkdtemp(prefix="festina-fake-shared-"))
        weakref.finalize(self, shutil.rmtree, self.shared_dir, True)

    def _maybe_fail(self, what: str) -> None:
        self.calls.append(what)
        if self.fail_next:
            self.fail_next -= 1
            raise SlurmCommandError([what], "timed out after 1 s")

    def version(self) -> tuple[int, int]:
        return (22, 5)

    def submit(self, spec: ServingJobSpec) -> int:
        self._maybe_fail("sbatch")
        job_id = next(self.ids)
        gres = (Gres("mps", None, spec.mps_pct),) if spec.mps_pct else (Gres("gpu", None, spec.gpus or 1),)
        self.jobs[job_id] = SlurmJob(job_id, "festina", "RUNNING", "None", spec.nodelist, gres, (),
                                     spec.comment or "", "root", "", "gpu")
        self.started.append((spec, job_id))
        return job_id

    def cancel(self, job_id: int) -> None:
        self._maybe_fail("scancel")
        self.cancelled.append(job_id)
        self.jobs.pop(job_id, None)

    def hold(self, job_id: int) -> None: ...
    def release(self, job_id: int) -> None: ...
    def requeue(self, job_id: int, nodelist: Sequence[str], timeout_s: float = 30.0) -> None: ...

    def get_job(self, job_id: int) -> SlurmJob | None:
        self._maybe_fail("squeue")
        return self.jobs.get(job_id)

    def get_jobs(self, job_ids: Sequence[int]) -> dict[int, SlurmJob]:
        self._maybe_fail("scontrol")
        # .get: it runs in a thread (SlurmRetry) while a test may change the jobs on the event loop.
        return {j: job for j in job_ids if (job := self.jobs.get(j)) is not None}

    def list_jobs(self) -> tuple[SlurmJob, ...]:
        self._maybe_fail("squeue")
        return tuple(self.jobs.values())

    def list_nodes(self) -> tuple[SlurmNode, ...]:
        self._maybe_fail("sinfo")
        return tuple(SlurmNode(n, "idle", (), "", 8, 0, (Gres("gpu", "h100", 2), Gres("mps", None, 200)), (),
                               address="127.0.0.1") for n in self.nodes)

    def drain(self, node: str, reason: str) -> None: ...
    def resume(self, node: str) -> None: ...


class Servers:
    """Runs an emulated server for each job the fake Slurm started, on the port festinad chose, with the secret
    its command line names the file of (as ``festina serve --secret-file`` does)."""

    def __init__(self, store: ProfileStore, slurm: FakeSlurm):
        self.store, self.slurm = store, slurm
        self.stack = AsyncExitStack()
        self.seen: set[int] = set()
        self.by_job: dict[int, AsyncExitStack] = {}  # each job's server, to kill one (its process gone)

    async def pump(self) -> None:
        for spec, job_id in self.slurm.started:
            if job_id in self.seen:
                continue
            self.seen.add(job_id)
            port = int(parse_comment(spec.comment or "")["port"])  # type: ignore[index]
            engine = SimulatedEngine(self.store, spec.model, GPU, time_scale=0.05)
            await engine.start()
            secret = read_secret_file(spec.command[spec.command.index("--secret-file") + 1]) \
                if "--secret-file" in spec.command else None
            own = self.by_job[job_id] = await self.stack.enter_async_context(AsyncExitStack())
            await own.enter_async_context(running_app(make_app(engine, secret), "127.0.0.1", port))

    async def kill(self, job_id: int) -> None:
        """The job's server is gone (scancel, a crash): its port refuses connections."""
        await self.by_job.pop(job_id).aclose()


def _free_port_base(span: int = 16) -> int:
    """A base whose next ``span`` ports are free now, below Linux's ephemeral range (32768+), so that
    no client connection of a concurrent test takes one of them before a server binds it."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32768 - span)
        try:
            for port in range(base, base + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range below 32768")


async def _festinad(store: ProfileStore, slurm: FakeSlurm, db: Store,
                    model_options: dict[str, ModelOptions] | None = None, node_control: Any = None) -> Festinad:
    policy = make_policy("festina", PolicyContext(store, GPU))
    slos = {m.name: m.slo for m in gateway_models(store, GPU, MODELS)}
    settings = FestinadSettings(serve_port_base=_free_port_base(), start_timeout_s=10, drain_timeout_s=1,
                                health_poll_s=0.02, job_poll_s=0.05, job_output_dir=str(slurm.shared_dir))
    festinad = Festinad(policy, store, slurm, db, slos, settings,
                        slurm_retry=SlurmRetry(slurm, attempts=3, backoff_s=0.01), model_options=model_options,
                        node_control=node_control)
    await festinad.setup()
    return festinad


@pytest.fixture
def db(tmp_path: Path) -> Store:
    engine = make_engine(f"sqlite:///{tmp_path / 'festina.db'}")
    migrate.upgrade(engine)
    return Store(engine)


async def _serve(festinad: Festinad, servers: Servers, store: ProfileStore) -> AsyncIterator[str]:
    gateway = Gateway(festinad.router, StoreRecorder(festinad.store),
                      gateway_models(store, GPU, MODELS, max_prompt_tokens=100))
    async with running_app(gateway.app()) as url:
        yield url


async def _ask(session: aiohttp.ClientSession, url: str, servers: Servers, headers: dict[str, str] | None = None,
               **body: Any) -> tuple[int, Any]:
    task = asyncio.ensure_future(session.post(f"{url}/v1/completions",
                                              json={"prompt": "hi", "max_tokens": 3, **body}, headers=headers))
    while not task.done():
        await servers.pump()  # a job "starts" its server once festinad submitted it
        await asyncio.sleep(0.01)
    async with task.result() as resp:
        return resp.status, await resp.json()


async def _run(store: ProfileStore, slurm: FakeSlurm, db: Store, scenario: Any) -> None:
    servers = Servers(store, slurm)
    festinad = await _festinad(store, slurm, db)
    try:
        async for url in _serve(festinad, servers, store):
            async with aiohttp.ClientSession() as session:
                await scenario(festinad, servers, session, url)
    finally:
        await festinad.close()
        await servers.stack.aclose()


def test_start_from_zero_records_job_and_decisions(store: ProfileStore, db: Store) -> None:
    slurm = FakeSlurm(store)

    async def scenario(festinad: Festinad, servers: Servers, session: aiohttp.ClientSession, url: str) -> None:
        status, body = await _ask(session, url, servers, model="llama-3.1-8b")
        assert status == 200 and body["choices"][0]["text"]
        (spec, job_id), = slurm.started
        assert spec.command[-8:-6] == ("--engine", "emulated") or "--engine" in spec.command
        assert spec.nodelist == ("n1",) and parse_comment(spec.comment or "")["model"] == "llama-3.1-8b"
        live = db.load_live_state().instances
        assert [(i.slurm_job_id, i.phase) for i in live] == [(job_id, InstancePhase.READY)]
        # A plan is carried out and recorded with its reason: stop drains, then scancel.
        await festinad.execute(Plan((StopInstance(live[0].id),), "test: scale in"))
        assert slurm.cancelled == [job_id] and not db.load_live_state().instances

    asyncio.run(_run(store, slurm, db, scenario))


def test_the_same_power_off_every_period_is_one_log_line_and_one_counted_decision(
        store: ProfileStore, db: Store, caplog: pytest.LogCaptureFixture) -> None:
    """The dev cluster's "power_off empty nodes" every 30 s for the same node: said once, recorded once."""
    slurm = FakeSlurm(store)

    async def scenario() -> None:
        festinad = await _festinad(store, slurm, db)
        try:
            with caplog.at_level(logging.INFO, logger="festina_hpc.daemon.festinad"):
                for _ in range(5):
                    await festinad.execute(Plan((PowerOff(1),), "power_off empty nodes"))
                await festinad.execute(Plan((PowerOn(1),), "queued work"))
        finally:
            await festinad.close()

    asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if "power saving" in r.getMessage()]
    assert said == ["PowerOff node n2 (power_off empty nodes): left to Slurm's power saving",
                    "PowerOff node n2 (power_off empty nodes): left to Slurm's power saving (repeated 4 times)",
                    "PowerOn node n2 (queued work): left to Slurm's power saving"]
    power = db.decisions(since=datetime(2000, 1, 1, tzinfo=UTC), kind="power")
    assert [(r.action, r.node_name, r.times_decided) for r in power] == [("power_off", "n2", 5), ("power_on", "n2", 1)]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "no-such-model"}, 404, "no-such-model"),
    ({"model": "llama-3.1-8b", "prompt": "word " * 101}, 400, "at most 100"),
])
def test_bad_requests_are_refused_before_any_job(store: ProfileStore, db: Store, body: dict[str, Any],
                                                 status: int, words: str) -> None:
    slurm = FakeSlurm(store)

    async def scenario(festinad: Festinad, servers: Servers, session: aiohttp.ClientSession, url: str) -> None:
        got, answer = await _ask(session, url, servers, **body)
        assert got == status and words in answer["error"]["message"]
        async with session.post(f"{url}/v1/completions", data=b"{oops") as resp:
            assert resp.status == 400
        assert not slurm.started

    asyncio.run(_run(store, slurm, db, scenario))


def test_failing_sbatch_is_retried_then_reported_and_the_daemon_keeps_serving(store: ProfileStore,
                                                                               db: Store) -> None:
    slurm = FakeSlurm(store)

    async def scenario(festinad: Festinad, servers: Servers, session: aiohttp.ClientSession, url: str) -> None:
        slurm.fail_next = 2  # two timeouts, then sbatch answers: retried with back-off
        status, _ = await _ask(session, url, servers, model="llama-3.1-8b")
        assert status == 200 and slurm.calls.count("sbatch") == 3
        slurm.fail_next = 10  # Slurm stays broken: a clear 503 naming the failure
        status, answer = await _ask(session, url, servers, model="mistral-7b")
        assert status == 503 and "timed out" in answer["error"]["message"]
        slurm.fail_next = 0
        status, _ = await _ask(session, url, servers, model="llama-3.1-8b")  # the ready one still serves
        assert status == 200
        await festinad.reconcile()  # and reconcile skips a Slurm that does not answer, then recovers
        status, _ = await _ask(session, url, servers, model="mistral-7b")
        assert status == 200

    asyncio.run(_run(store, slurm, db, scenario))


def test_node_that_disappears_loses_its_instances_and_requests_start_elsewhere(store: ProfileStore,
                                                                               db: Store) -> None:
    slurm = FakeSlurm(store)

    async def scenario(festinad: Festinad, servers: Servers, session: aiohttp.ClientSession, url: str) -> None:
        assert (await _ask(session, url, servers, model="llama-3.1-8b"))[0] == 200
        (spec, job_id), = slurm.started
        lost = spec.nodelist[0]
        slurm.nodes.remove(lost)
        await festinad.reconcile()
        assert job_id in slurm.cancelled and not festinad.view.live
        assert (await _ask(session, url, servers, model="llama-3.1-8b"))[0] == 200
        assert slurm.started[-1][0].nodelist != (lost,)

    asyncio.run(_run(store, slurm, db, scenario))


def test_a_dead_instances_requests_wait_for_its_replacement_before_reconcile(store: ProfileStore,
                                                                            db: Store) -> None:
    """scancel behind festinad's back: the next request finds the instance unreachable, festinad checks it at
    once (no reconcile runs here), stops it, and the request waits for a replacement as for a cold start."""
    slurm = FakeSlurm(store)

    async def scenario(festinad: Festinad, servers: Servers, session: aiohttp.ClientSession, url: str) -> None:
        assert (await _ask(session, url, servers, model="llama-3.1-8b"))[0] == 200
        ((_, job_id),) = slurm.started
        (dead,) = festinad.view.live.values()
        slurm.jobs.pop(job_id)  # cancelled: gone from squeue
        await servers.kill(job_id)
        status, body = await _ask(session, url, servers, model="llama-3.1-8b")
        assert status == 200, body
        assert len(slurm.started) == 2 and dead.id not in festinad.view.live
        (replacement,) = festinad.view.live.values()
        assert replacement.phase is InstancePhase.READY and replacement.slurm_job_id == slurm.started[1][1]
        phases = {row.id: row.phase for row in db.load_live_state().instances}
        assert dead.id not in phases  # stopped in the database too

    asyncio.run(_run(store, slurm, db, scenario))


def test_an_instance_reported_unreachable_that_answers_is_ready_again(store: ProfileStore, db: Store) -> None:
    slurm = FakeSlurm(store)

    async def scenario(festinad: Festinad, servers: Servers, session: aiohttp.ClientSession, url: str) -> None:
        assert (await _ask(session, url, servers, model="llama-3.1-8b"))[0] == 200
        (inst,) = festinad.view.live.values()
        assert inst.endpoint is not None
        festinad.router.failed(inst.endpoint)  # a connection lost, not the instance
        assert inst.phase is InstancePhase.LOADING
        for _ in range(100):
            if inst.phase is InstancePhase.READY:
                break
            await asyncio.sleep(0.01)
        assert inst.phase is InstancePhase.READY and not inst.lost
        assert len(slurm.started) == 1 and slurm.cancelled == []

    asyncio.run(_run(store, slurm, db, scenario))


def test_restart_takes_jobs_back_adopts_user_jobs_and_cancels_orphans(store: ProfileStore, db: Store) -> None:
    slurm = FakeSlurm(store)
    servers = Servers(store, slurm)

    async def main() -> None:
        first = await _festinad(store, slurm, db)
        async for url in _serve(first, servers, store):
            async with aiohttp.ClientSession() as session:
                assert (await _ask(session, url, servers, model="llama-3.1-8b"))[0] == 200
        await first.close()
        (spec, job_id), = slurm.started
        port = int(parse_comment(spec.comment or "")["port"])
        # While festinad is down: a user submits their own serving job, and a job of an instance festinad
        # no longer holds is still running (a crash between its decision and scancel).
        user = SlurmJob(7, "mine", "RUNNING", "None", ("n2",), (Gres("mps", None, 50),), (),
                        f"festina:model=mistral-7b,instance=alice-1,port={port + 1}", "alice", "", "gpu")
        orphan = SlurmJob(8, "x", "RUNNING", "None", ("n2",), (Gres("mps", None, 50),), (),
                          "festina:model=mistral-7b,instance=999,port=1", "root", "", "gpu")
        slurm.jobs.update({7: user, 8: orphan})
        slurm.started.append((ServingJobSpec("mistral-7b", "alice-1", ("x",), "/tmp/o", mps_pct=50,
                                             comment=user.comment), 7))
        await servers.pump()
        second = await _festinad(store, slurm, db)
        try:
            assert slurm.cancelled == [8]
            assert {i.slurm_job_id for i in second.view.live.values()} == {job_id, 7}
            for _ in range(100):
                if all(i.phase is InstancePhase.READY for i in second.view.live.values()):
                    break
                await asyncio.sleep(0.02)
            assert all(i.phase is InstancePhase.READY for i in second.view.live.values())
            async for url in _serve(second, servers, store):
                async with aiohttp.ClientSession() as session:
                    assert (await _ask(session, url, servers, model="mistral-7b"))[0] == 200
            assert len(slurm.started) == 2  # served by the adopted job: nothing new submitted
        finally:
            await second.close()
            await servers.stack.aclose()

    asyncio.run(main())


def test_a_user_job_on_a_resuming_node_is_adopted_before_anything_is_placed(store: ProfileStore,
                                                                          db: Store) -> None:
    # A user's serving job whose node Slurm's power saving is still resuming is CONFIGURING: its MPS share
    # is already taken on that node. Found by the admin-guide walk on the dev cluster: festinad ignored it
    # until it ran, placed two whole-GPU instances on the same 2-GPU node, and its own job pended behind it.
    slurm = FakeSlurm(store)
    user = SlurmJob(7, "mine", "CONFIGURING", "None", ("n1",), (Gres("mps", None, 50),), (),
                    "festina:model=mistral-7b,instance=alice-1,port=1", "alice", "", "gpu")
    slurm.jobs[7] = user

    async def main() -> None:
        festinad = await _festinad(store, slurm, db)
        try:
            (inst,) = festinad.view.live.values()
            assert inst.slurm_job_id == 7 and inst.phase is InstancePhase.LOADING  # ready once it answers
            n1 = festinad.view.node(festinad.node_names.index("n1"))
            assert sorted(festinad.view.gpu(g).sm_pct_allocated for g in n1.gpus) == [0.0, 50.0]
        finally:
            await festinad.close()

    asyncio.run(main())


async def _until_ready(inst: Any, servers: Servers) -> None:
    for _ in range(500):
        await servers.pump()
        if inst.phase is InstancePhase.READY:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"instance {inst.id} never turned ready")


def test_catalogue_bounds_engine_args_and_account_are_honoured(store: ProfileStore, db: Store) -> None:
    slurm = FakeSlurm(store)
    options = {"llama-3.1-8b": ModelOptions(ModelLimits(min_instances=1), account="ml-team",
                                            engine_args="--chunk-tokens 512 --max-model-len 8192"),
               "mistral-7b": ModelOptions(ModelLimits(max_instances=1))}

    async def main() -> None:
        since = datetime.now(UTC) - timedelta(seconds=1)
        festinad = await _festinad(store, slurm, db, options)  # setup reconciles: the minimum starts at once
        try:
            (kept,) = festinad.view.live.values()
            await _until_ready(kept, servers)
            (spec, _), = slurm.started
            assert spec.model == "llama-3.1-8b" and spec.account == "ml-team"
            assert "--chunk-tokens 512" in " ".join(spec.command) and "--max-model-len" not in spec.command
            await festinad.execute(Plan((StopInstance(kept.id),), "test: scale to zero"))
            assert kept.id in festinad.view.live and not slurm.cancelled  # min_instances keeps it
            free = [g.id for g in festinad.view.gpus() if not g.instances]
            await festinad.execute(Plan((StartInstance("mistral-7b", (free[0],)),), "test"))
            await festinad.execute(Plan((StartInstance("mistral-7b", (free[1],)),), "test: second"))
            assert len(festinad.view.instances_of("mistral-7b")) == 1  # max_instances = 1
            reasons = [d.reason for d in db.decisions(since=since) if d.reason.startswith("refused")]
            assert reasons == ["refused: llama-3.1-8b: min_instances = 1 keeps instance "
                               f"{kept.id} (test: scale to zero)",
                               "refused: mistral-7b: max_instances = 1 reached (test: second)"]
            await _until_ready(festinad.view.instances_of("mistral-7b")[0], servers)
            slurm.jobs.clear()  # every job gone: the minimum is started again
            await festinad.reconcile()
            assert [i.model for i in festinad.view.live.values()] == ["llama-3.1-8b"]
            await _until_ready(festinad.view.instances_of("llama-3.1-8b")[0], servers)
            assert [s.model for s, _ in slurm.started] == ["llama-3.1-8b", "mistral-7b", "llama-3.1-8b"]
        finally:
            await festinad.close()
            await servers.stack.aclose()

    servers = Servers(store, slurm)
    asyncio.run(main())


def test_the_view_follows_the_gpu_slurm_gave_an_mps_job(store: ProfileStore, db: Store) -> None:
    slurm = FakeSlurm(store)

    async def main() -> None:
        festinad = await _festinad(store, slurm, db)
        try:
            await festinad.execute(Plan((StartInstance("llama-3.1-8b", (0,), sm_pct=40, memory_fraction=0.3),),
                                        "test: a share"))
            (first,) = festinad.view.live.values()
            await _until_ready(first, servers)
            (spec, job_id), = slurm.started
            assert spec.mps_pct == 40 and first.gpus == (0,)
            # Slurm, not festina, picks the GPU of an MPS job: this one landed on the node's second GPU.
            slurm.jobs[job_id] = replace(slurm.jobs[job_id], gres_detail=("mps:40(IDX:1)",))
            await festinad.reconcile()
            assert first.gpus == (1,) and [g.sm_pct_allocated for g in festinad.view.gpus()[:2]] == [0.0, 40.0]
            (row,) = db.load_live_state().instances
            assert row.gpus == (festinad._gpu_db[1],)
            # A share asked on the empty GPU 0, where Slurm would not put it: it runs there as a whole GPU.
            await festinad.execute(Plan((StartInstance("mistral-7b", (0,), sm_pct=30, memory_fraction=0.3),),
                                        "test: a second share"))
            second = festinad.view.instances_of("mistral-7b")[0]
            await _until_ready(second, servers)
            assert second.gpus == (0,) and second.sm_pct == 100.0
            assert (slurm.started[-1][0].gpus, slurm.started[-1][0].mps_pct) == (1, None)
        finally:
            await festinad.close()
            await servers.stack.aclose()

    servers = Servers(store, slurm)
    asyncio.run(main())


def test_tenants_requests_reach_the_database_and_split_their_gpus_energy(store: ProfileStore, db: Store) -> None:
    """Two keys' requests on one instance: each record names its key's user and account, and the GPU's
    energy over the hour is charged to the two accounts by their tokens, summing to the GPU's energy."""
    slurm = FakeSlurm(store)
    ring = KeyRing(db.engine, store)
    alice, _ = ring.create("alice", "proj1")
    bob, _ = ring.create("bob", "proj2", ["llama-3.1-8b"])
    recorder = StoreRecorder(db)

    async def scenario() -> None:
        servers = Servers(store, slurm)
        festinad = await _festinad(store, slurm, db)
        auth = Authenticator(ring, AuthConfig(key_cache_ttl_s=0.0))
        gateway = Gateway(festinad.router, recorder, gateway_models(store, GPU, MODELS), auth=auth)
        try:
            async with running_app(gateway.app()) as url, aiohttp.ClientSession() as session:
                for token, model, expected in [(alice, "llama-3.1-8b", 200), (bob, "llama-3.1-8b", 200),
                                               (alice, "llama-3.1-8b", 200), (bob, "mistral-7b", 403)]:
                    status, body = await _ask(session, url, servers, {"Authorization": f"Bearer {token}"},
                                              model=model, max_tokens=3 if token == alice else 6)
                    assert status == expected, body
        finally:
            await festinad.close()
            await servers.stack.aclose()

    asyncio.run(scenario())
    assert recorder.flush() == 3
    requests = run_query(db.engine, "slo_attainment_per_model").as_dicts()
    assert sum(r["requests"] for r in requests) == 3  # the 403 reached no instance and left no record
    (instance,) = db.load_live_state().instances
    (gpu,) = instance.gpus
    with db.engine.connect() as connection:
        arrivals = connection.execute(text("SELECT MIN(arrival_at) FROM requests")).scalar_one()
        tokens = dict(connection.execute(text(
            "SELECT account, SUM(prompt_tokens + output_tokens) FROM requests GROUP BY account")).all())
    hour = (arrivals if not isinstance(arrivals, str) else datetime.fromisoformat(arrivals)).replace(
        minute=0, second=0, microsecond=0, tzinfo=UTC)
    db.record_energy([EnergyReading(gpu, hour + timedelta(seconds=1), 100.0),
                      EnergyReading(gpu, hour + timedelta(seconds=2), 1300.0, shares={instance.id: 1.0})])
    charged = {r["account"]: r["energy_j"] for r in run_query(db.engine, "energy_by_tenant").as_dicts()}
    total_tokens = tokens["proj1"] + tokens["proj2"]
    assert charged == pytest.approx({"proj1": 1200.0 * tokens["proj1"] / total_tokens,
                                     "proj2": 1200.0 * tokens["proj2"] / total_tokens})
    assert sum(charged.values()) == pytest.approx(1200.0)


def test_parse_comment() -> None:
    assert parse_comment("festina:model=m,instance=3,port=9") == {"model": "m", "instance": "3", "port": "9"}
    assert parse_comment("something else") is None
    assert parse_comment("festina:instance=3") is None


def test_each_instance_answers_only_festinad_with_its_own_secret(store: ProfileStore, db: Store) -> None:
    slurm = FakeSlurm(store)

    async def scenario(festinad: Festinad, servers: Servers, session: aiohttp.ClientSession, url: str) -> None:
        for model in MODELS:
            assert (await _ask(session, url, servers, model=model))[0] == 200  # the gateway sends the secret
        secrets = []
        for spec, _ in slurm.started:
            path = Path(spec.command[spec.command.index("--secret-file") + 1])
            assert path.parent == slurm.shared_dir / "secrets" and stat.S_IMODE(path.stat().st_mode) == 0o600
            secret = read_secret_file(path)
            # The path travels; the secret is on no command line, comment or batch script (squeue, ps, Slurm).
            assert secret not in render_script(spec) and secret not in (spec.comment or "")
            secrets.append(secret)
        assert len(set(secrets)) == 2
        inst = next(i for i in festinad.view.live.values() if i.model == MODELS[0])
        assert inst.endpoint is not None and inst.endpoint.secret in secrets and secrets[0] not in repr(inst.endpoint)
        # A cluster user who read the port from squeue: refused, and /health tells them nothing of the queue.
        body = {"model": MODELS[0], "prompt": "hi", "max_tokens": 1}
        async with session.post(f"{inst.endpoint.url}/v1/completions", json=body) as resp:
            assert resp.status == 401
        async with session.post(f"{inst.endpoint.url}/admin/settings", json={"batch_cap": 1}) as resp:
            assert resp.status == 401
        async with session.get(f"{inst.endpoint.url}/health") as resp:
            assert set(await resp.json()) == {"status", "model"}
        # festinad's own load poll gets the full report.
        assert await festinad._health(inst.endpoint.url, inst.endpoint.secret) is not None
        path = Path(slurm.started[0][0].command[slurm.started[0][0].command.index("--secret-file") + 1])
        await festinad.execute(Plan((StopInstance(inst.id),), "test: scale in"))
        assert not path.exists()  # a stopped instance's secret is gone with it

    asyncio.run(_run(store, slurm, db, scenario))


def test_a_restarted_festinad_reads_its_instances_secrets_back(store: ProfileStore, db: Store) -> None:
    slurm = FakeSlurm(store)
    servers = Servers(store, slurm)

    async def main() -> None:
        first = await _festinad(store, slurm, db)
        async for url in _serve(first, servers, store):
            async with aiohttp.ClientSession() as session:
                assert (await _ask(session, url, servers, model="llama-3.1-8b"))[0] == 200
        (old,) = first.view.live.values()
        secret = old.endpoint.secret if old.endpoint else None
        await first.close()
        second = await _festinad(store, slurm, db)
        try:
            (inst,) = second.view.live.values()
            await _until_ready(inst, servers)
            assert inst.endpoint is not None and secret and inst.endpoint.secret == secret
            async for url in _serve(second, servers, store):
                async with aiohttp.ClientSession() as session:
                    assert (await _ask(session, url, servers, model="llama-3.1-8b"))[0] == 200
            assert len(slurm.started) == 1  # served by the job it took back
        finally:
            await second.close()
            await servers.stack.aclose()

    asyncio.run(main())


class FakeNodeControl:
    """festina-node's answers to ``instance_secret``: the secret of each job's own file, by job id."""

    def __init__(self, secrets: dict[int, str]):
        self.secrets = secrets
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def call(self, node: str, op: str, args: dict[str, Any]) -> Any:
        self.calls.append((node, op, dict(args)))
        return self.secrets.get(args["job_id"])


def test_a_users_own_job_with_a_secret_is_adopted_with_the_secret_its_node_reads(store: ProfileStore,
                                                                                db: Store) -> None:
    slurm = FakeSlurm(store)
    servers = Servers(store, slurm)
    path, secret = write_secret(slurm.shared_dir / "alice" / ".festina", "alice-1")
    port = _free_port_base(1)
    user = SlurmJob(7, "mine", "RUNNING", "None", ("n2",), (Gres("mps", None, 50),), (),
                    f"festina:model=mistral-7b,instance=alice-1,port={port}", "alice", "", "gpu")
    slurm.jobs[7] = user
    slurm.started.append((ServingJobSpec("mistral-7b", "alice-1", ("festina", "serve", "--secret-file", str(path)),
                                         "/tmp/o", mps_pct=50, comment=user.comment), 7))

    async def main() -> None:
        await servers.pump()
        nodes = FakeNodeControl({7: secret})
        festinad = await _festinad(store, slurm, db, node_control=nodes)
        try:
            (inst,) = festinad.view.live.values()
            await _until_ready(inst, servers)
            assert nodes.calls == [("n2", "instance_secret", {"job_id": 7})]
            assert inst.endpoint is not None and inst.endpoint.secret == secret
            async for url in _serve(festinad, servers, store):
                async with aiohttp.ClientSession() as session:
                    assert (await _ask(session, url, servers, model="mistral-7b"))[0] == 200
            assert len(slurm.started) == 1  # served by the adopted job
        finally:
            await festinad.close()
            await servers.stack.aclose()

    asyncio.run(main())


def test_a_secured_job_whose_secret_festinad_cannot_learn_is_reported(store: ProfileStore, db: Store,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    slurm = FakeSlurm(store)
    servers = Servers(store, slurm)
    path, _ = write_secret(slurm.shared_dir / "alice" / ".festina", "alice-1")
    port = _free_port_base(1)
    user = SlurmJob(7, "mine", "RUNNING", "None", ("n2",), (Gres("mps", None, 50),), (),
                    f"festina:model=mistral-7b,instance=alice-1,port={port}", "alice", "", "gpu")
    slurm.jobs[7] = user
    slurm.started.append((ServingJobSpec("mistral-7b", "alice-1", ("festina", "serve", "--secret-file", str(path)),
                                         "/tmp/o", mps_pct=50, comment=user.comment), 7))

    async def main() -> None:
        await servers.pump()
        festinad = await _festinad(store, slurm, db, node_control=FakeNodeControl({}))  # the node knows none
        try:
            (inst,) = festinad.view.live.values()
            for _ in range(100):
                if "answers only with a secret festinad does not hold" in caplog.text:
                    break
                await asyncio.sleep(0.02)
            assert "instance 1 (job 7)" in caplog.text and "its requests will fail" in caplog.text
            assert inst.endpoint is not None and inst.endpoint.secret is None
        finally:
            await festinad.close()
            await servers.stack.aclose()

    with caplog.at_level("WARNING", logger="festina_hpc.daemon.festinad"):
        asyncio.run(main())


def test_reconcile_writes_each_ended_jobs_end_final_state_and_exit_code(store: ProfileStore, db: Store) -> None:
    """Jobs a node's epilog recorded (COMPLETING, no end): one Slurm still lists as ended, one only scontrol
    knows (squeue hid it), one Slurm forgot; a running one stays open."""
    from festina_hpc.db.store import JobRecord

    slurm = FakeSlurm(store)
    start_s = 1_796_686_000
    ended = SlurmJob(7, "x", "FAILED", "None", ("n1",), (), (), "", "alice", "ops", "gpu", start_time_s=start_s,
                     end_time_s=start_s + 60, exit_code=3, exit_signal=0)
    hidden = replace(ended, job_id=8, state="CANCELLED", end_time_s=start_s + 30, exit_code=0)
    running = replace(ended, job_id=10, state="RUNNING", end_time_s=None, exit_code=None, exit_signal=None)
    slurm.jobs.update({7: ended, 10: running})
    db.upsert_jobs([JobRecord(i, "COMPLETING", user_name="alice", node_list="n1") for i in (7, 8, 9)]
                   + [JobRecord(10, "RUNNING", user_name="alice")])

    # scontrol knows job 8, which squeue hid; nobody knows job 9.
    slurm.get_jobs = lambda job_ids: {8: hidden} if 8 in job_ids else {}  # type: ignore[method-assign]

    async def go() -> None:
        festinad = await _festinad(store, slurm, db)  # setup() reconciles once: that is the one period
        await festinad.close()

    before = datetime.now(UTC)
    asyncio.run(go())
    with db.engine.connect() as conn:
        rows = {r.job_id: r for r in conn.execute(text(
            "SELECT job_id, state, end_at, exit_code, exit_signal, account FROM slurm_jobs"))}
    assert (rows[7].state, rows[7].exit_code, rows[7].exit_signal, rows[7].account) == ("FAILED", 3, 0, "ops")
    assert (rows[8].state, rows[8].exit_code) == ("CANCELLED", 0)
    assert str(rows[7].end_at).startswith(str(datetime.fromtimestamp(start_s + 60, UTC).replace(tzinfo=None)))
    # Forgotten: ended when festinad found it gone, its last known state kept, no exit code.
    assert rows[9].state == "COMPLETING" and rows[9].end_at is not None and rows[9].exit_code is None
    assert datetime.fromisoformat(str(rows[9].end_at)).replace(tzinfo=UTC) >= before - timedelta(seconds=1)
    assert [j.job_id for j in db.open_jobs()] == [10]


def test_starting_jobs_share_one_slurm_lookup_a_period_and_one_that_ends_fails_its_start(store: ProfileStore,
                                                                                         db: Store) -> None:
    """Four instances starting at once: Slurm is asked about all four in one call a period (not a ``scontrol
    show job`` each); a job that fails or that Slurm forgets fails its start, saying so; the others come up."""
    slurm = FakeSlurm(store)
    lookups: list[tuple[int, ...]] = []
    one_by_one: list[int] = []
    get_jobs = slurm.get_jobs

    def counted_get_jobs(job_ids: Sequence[int]) -> dict[int, SlurmJob]:
        lookups.append(tuple(job_ids))
        return get_jobs(job_ids)

    slurm.get_jobs = counted_get_jobs  # type: ignore[method-assign]
    slurm.get_job = lambda job_id: one_by_one.append(job_id)  # type: ignore[method-assign,func-returns-value]

    async def main() -> None:
        festinad = await _festinad(store, slurm, db)
        try:
            free = [g.id for g in festinad.view.gpus() if not g.instances]
            await festinad.execute(Plan(tuple(StartInstance("llama-3.1-8b", (g,)) for g in free[:4]), "test"))
            starting = sorted(festinad.view.live.values(), key=lambda i: i.id)
            assert len(starting) == 4
            period_s = festinad.settings.job_poll_s
            begun = asyncio.get_running_loop().time()
            await asyncio.sleep(10 * period_s)  # no server answers yet: every job is still starting
            elapsed_s = asyncio.get_running_loop().time() - begun
            jobs = sorted(job_id for _, job_id in slurm.started)
            assert one_by_one == [] and lookups and max(map(len, lookups)) == 4
            assert len(lookups) <= elapsed_s / period_s + 2, (len(lookups), elapsed_s)  # one a period, not four
            failed, gone = jobs[0], jobs[1]
            slurm.jobs[failed] = replace(slurm.jobs[failed], state="FAILED")
            del slurm.jobs[gone]
            for inst in starting[:2]:
                with pytest.raises(Exception) as info:
                    await asyncio.wait_for(asyncio.shield(inst.ready), 5)
                assert str(info.value).endswith(f"job {inst.slurm_job_id} ended "
                                                f"({'FAILED' if inst.slurm_job_id == failed else 'gone'}) "
                                                "before it served")
            servers.seen.update({failed, gone})  # their jobs never run a server (their secrets are gone too)
            for inst in starting[2:]:
                await _until_ready(inst, servers)
            assert one_by_one == [] and festinad.jobs.watched == frozenset()
        finally:
            await festinad.close()
            await servers.stack.aclose()

    servers = Servers(store, slurm)
    asyncio.run(main())


@dataclass(frozen=True)
class Reboot:
    """An action type festinad was never taught."""

    node: int


def test_an_action_festinad_does_not_know_fails_the_plan_loudly(store: ProfileStore, db: Store) -> None:
    slurm = FakeSlurm(store)

    async def main() -> None:
        festinad = await _festinad(store, slurm, db)
        try:
            with pytest.raises(TypeError, match=r"^festinad cannot carry out a Reboot: not an action it knows "):
                await festinad.execute(Plan((PowerOff(1), Reboot(0)), "test"))  # type: ignore[arg-type]
            assert db.decisions(since=datetime.now(UTC) - timedelta(minutes=1)) == []  # nothing of it recorded
        finally:
            await festinad.close()

    asyncio.run(main())
