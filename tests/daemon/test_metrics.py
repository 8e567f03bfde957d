"""festinad's ``GET /metrics``: the windows it keeps, and the exposition of a running festinad (fake Slurm).

The running test goes through ``run_festinad`` itself, so the route, the
recorder fan-out and the decision count are checked as the daemon wires them;
energy comes from readings written to its database as festina-node would.
The metrics answer on their own listener (``metrics_listen``), never on the gateway.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from festina_hpc.daemon.festinad import StoreRecorder
from festina_hpc.daemon.gateway import gateway_models
from festina_hpc.daemon.metrics import DecisionRate, FestinadMetrics, RequestWindow
from festina_hpc.daemon.records import CompletionRecord, Outcome
from festina_hpc.daemon.service import Periods, run_festinad
from festina_hpc.db.node_reports import READING_STALE_S
from festina_hpc.db.store import EnergyReading, GpuRecord, NodeRecord, Store
from festina_hpc.errors import FestinaError
from festina_hpc.policy.festina import FestinaPolicy
from festina_hpc.policy.types import GpuSettings, Plan, StopInstance
from festina_hpc.profiles.store import ProfileStore
from tests.daemon.test_festinad import GPU, MODELS, FakeSlurm, Servers, _ask, _festinad, db  # noqa: F401


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def record(model: str, met: bool) -> CompletionRecord:
    return CompletionRecord(model=model, arrival_unix_s=0.0, outcome=Outcome.OK, status=200, stream=True,
                            endpoint=None, instance_id=None, prompt_tokens=1, output_tokens=1, ttft_s=0.1,
                            tbt_mean_s=None, tbt_max_s=None, e2e_s=0.1, route_s=0.0, ttft_slo_s=1.0, tbt_slo_s=1.0,
                            slo_met=met)


def test_request_window_forgets_old_outcomes_but_keeps_counting() -> None:
    clock = Clock()
    window = RequestWindow(window_s=60, clock=clock)
    for met in (False, True, True):
        window.record(record("a", met))
    assert window.attainment() == {"a": 2 / 3}
    clock.now_s += 61
    window.record(record("a", True))
    assert window.attainment() == {"a": 1.0} and window.totals == {"a": 4}
    clock.now_s += 61
    assert window.attainment() == {"a": None} and window.totals == {"a": 4}


def test_decision_rate_over_its_window() -> None:
    clock = Clock()
    rate = DecisionRate(window_s=10, clock=clock)
    rate.add(3)
    rate.add(0)
    clock.now_s += 5
    rate.add(2)
    assert (rate.per_s(), rate.total) == (0.5, 5)
    clock.now_s += 6
    assert (rate.per_s(), rate.total) == (0.2, 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_running_festinad_serves_its_metrics(store: ProfileStore, db: Store) -> None:  # noqa: F811
    slurm = FakeSlurm(store)
    servers = Servers(store, slurm)

    async def scenario() -> None:
        festinad = await _festinad(store, slurm, db)
        stop = asyncio.Event()
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        port, metrics_port = _free_port(), _free_port()
        task = asyncio.ensure_future(run_festinad(
            festinad, StoreRecorder(db), gateway_models(store, GPU, MODELS), "127.0.0.1", port, stop,
            Periods(reconcile_s=60, scale_s=60, consolidate_s=60, flush_s=0.2), on_ready=ready.set_result,
            metrics_listen=("127.0.0.1", metrics_port)))
        try:
            url = await asyncio.wait_for(asyncio.shield(ready), 20)
            async with aiohttp.ClientSession() as session:
                status, _ = await _ask(session, url, servers, model="llama-3.1-8b")
                assert status == 200
                # The recorder fan-out hands the record to the router too: the policy learns the answer's
                # 3 tokens at its next decision (its prior: 256).
                festinad.router.learn()
                assert isinstance(festinad.policy, FestinaPolicy)
                assert festinad.policy.stats.output_tokens("llama-3.1-8b") == pytest.approx(256 + 0.05 * (3 - 256))
                await festinad.execute(Plan((StopInstance(999_999),), "test: a decision with nothing to stop"))
                # What festina-node writes: two readings of the instance's GPU, all of it the instance's.
                live = db.load_live_state()
                (instance,) = live.instances
                gpu_id = instance.gpus[0]
                t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)  # fresh: within the stale period
                db.record_energy([EnergyReading(gpu_id, t0, 1000.0, 250.0, {instance.id: 1.0}),
                                  EnergyReading(gpu_id, t0 + timedelta(seconds=2), 1600.0, 300.0,
                                                {instance.id: 1.0})])
                async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
                    text = await resp.text()
                async with session.get(f"{url}/metrics") as resp:
                    assert resp.status == 404  # the gateway, which users reach, does not show them
                async with session.get(f"http://127.0.0.1:{metrics_port}/admin/consolidate") as resp:
                    assert resp.status == 404  # and the metrics listener serves nothing else
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await servers.stack.aclose()
        node = next(n.name for n in live.nodes if any(g.id == gpu_id and g.node_id == n.id for g in live.gpus))
        index = next(g.gpu_index for g in live.gpus if g.id == gpu_id)
        got = _samples(text)
        llama = (("model", "llama-3.1-8b"),)
        gpu = (("gpu", str(index)), ("node", node))
        assert got[("festina_model_requests_total", llama)] == 1
        assert got[("festina_model_slo_attainment_ratio", llama)] in (0.0, 1.0)  # one request, met or not
        assert got[("festina_model_energy_joules_total", llama)] == 600.0
        assert got[("festina_model_power_watts", llama)] == 300.0
        assert got[("festina_gpu_energy_joules_total", gpu)] == 1600.0
        assert got[("festina_gpu_power_watts", gpu)] == 300.0
        assert got[("festina_decisions_total", ())] == 1
        assert got[("festina_decisions_per_second", ())] > 0
        assert (got[("festina_nodes_powered", ())], got[("festina_nodes", ())]) == (2, 2)

    asyncio.run(scenario())


class _View:
    """What FestinadMetrics reads of festinad besides the database: no cluster yet, no decisions."""

    cluster = None
    decision_rate = DecisionRate()


def test_stale_gpu_power_is_dropped_not_frozen(db: Store) -> None:  # noqa: F811
    db.upsert_nodes([NodeRecord("n01", "mixed", True, 1)])
    gpu_id = db.upsert_gpus([GpuRecord("n01", 0, "h100-sxm-80gb")])[("n01", 0)]
    instance = db.create_instance("llama8b", [gpu_id], at=datetime(2026, 3, 1, 11, tzinfo=UTC), sm_pct=100.0,
                                  batch_cap=8, memory_fraction=0.5, slurm_job_id=4242)
    last = datetime(2026, 3, 1, 12, tzinfo=UTC)  # the GPU's last job ended here: the node samples it no more
    # festina-node's controller locked 900 MHz and applied a 60 % share to the job (DbEnergySink.settings).
    db.record_settings(gpu_id, GpuSettings(clock_mhz=900, sm_pct={4242: 60.0}), at=last - timedelta(minutes=1))
    db.record_energy([EnergyReading(gpu_id, last - timedelta(seconds=2), 1000.0, 280.0, {instance: 1.0}),
                      EnergyReading(gpu_id, last, 1582.0, 291.0, {instance: 1.0})])
    wall = [last + timedelta(seconds=5)]
    mono = Clock()
    metrics = FestinadMetrics(_View(), RequestWindow(clock=mono), db.engine, db_cache_s=10.0,  # type: ignore[arg-type]
                              clock=mono, wall_clock=lambda: wall[0])

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = await metrics.handle(None)  # type: ignore[arg-type]
        assert response.body is not None
        return _samples(bytes(response.body).decode())  # type: ignore[arg-type]

    gpu, model = (("gpu", "0"), ("node", "n01")), (("model", "llama8b"),)
    got = asyncio.run(scrape())
    assert got[("festina_gpu_power_watts", gpu)] == 291.0 and got[("festina_model_power_watts", model)] == 291.0
    job = (("gpu", "0"), ("job", "4242"), ("node", "n01"))
    assert got[("festina_gpu_locked_clock_hertz", gpu)] == 900e6 and got[("festina_job_sm_share_percent", job)] == 60.0
    # Past the stale period, even from the cached query (the monotonic clock has not moved): gone, not 291 W.
    wall[0] = last + timedelta(seconds=READING_STALE_S + 1)
    got = asyncio.run(scrape())
    assert ("festina_gpu_power_watts", gpu) not in got and ("festina_model_power_watts", model) not in got
    assert ("festina_gpu_locked_clock_hertz", gpu) not in got and ("festina_job_sm_share_percent", job) not in got
    assert got[("festina_gpu_energy_joules_total", gpu)] == 1582.0  # the counter keeps its total
    mono.now_s += 60  # and from a new query, nine minutes on
    wall[0] = last + timedelta(minutes=9)
    got = asyncio.run(scrape())
    assert ("festina_gpu_power_watts", gpu) not in got and got[("festina_gpu_energy_joules_total", gpu)] == 1582.0


def test_metrics_port_taken_is_one_line_naming_the_key(store: ProfileStore, db: Store) -> None:  # noqa: F811
    slurm = FakeSlurm(store)

    async def scenario() -> None:
        festinad = await _festinad(store, slurm, db)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            metrics_port = taken.getsockname()[1]
            with pytest.raises(FestinaError, match=rf"^cannot serve metrics on 127.0.0.1:{metrics_port} "
                                                   r"\(\[daemon\] metrics_listen\): "):
                await run_festinad(festinad, StoreRecorder(db), gateway_models(store, GPU, MODELS), "127.0.0.1",
                                   _free_port(), asyncio.Event(), Periods(), metrics_listen=("127.0.0.1", metrics_port))

    asyncio.run(scenario())
