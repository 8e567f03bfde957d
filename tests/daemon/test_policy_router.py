"""Scale from zero through the policy: the first request waits for a started instance, then it serves."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from festina_hpc.daemon.gateway import Gateway, GatewayConfig, gateway_models
from festina_hpc.daemon.metrics import FanOut
from festina_hpc.daemon.policy_router import READY_POLL_S, InstanceLaunch, LiveCluster, PolicyRouter
from festina_hpc.daemon.records import CompletionRecord, MemoryRecorder, Outcome
from festina_hpc.daemon.routing import Endpoint, NoInstance
from festina_hpc.policy.base import PolicyContext, make_policy
from festina_hpc.policy.common import TokenStats
from festina_hpc.policy.festina import FestinaPolicy
from festina_hpc.policy.types import InstancePhase, StartInstance
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.engine import EngineSettings, SimulatedEngine
from festina_hpc.serve.server import running_app, simulated_server
from tests.serve.conftest import GPU, MODEL


class InProcessStarter:
    """``start_instance`` that starts a simulated server in this process after ``load_s`` (a cold start)."""

    def __init__(self, store: ProfileStore, stack: AsyncExitStack, load_s: float, fail: bool = False):
        self.store, self.stack, self.load_s, self.fail = store, stack, load_s, fail
        self.launches: list[InstanceLaunch] = []

    async def __call__(self, launch: InstanceLaunch) -> Endpoint:
        self.launches.append(launch)
        await asyncio.sleep(self.load_s)
        if self.fail:
            raise RuntimeError("sbatch: error: invalid partition")
        engine = SimulatedEngine(self.store, launch.model, launch.gpu_type,
                                 EngineSettings(sm_pct=launch.sm_pct, batch_cap=launch.batch_cap))
        url = await self.stack.enter_async_context(simulated_server(engine))
        return Endpoint(url)


def make_router(store: ProfileStore, starter: InProcessStarter) -> PolicyRouter:
    models = gateway_models(store, GPU, [MODEL])
    cluster = LiveCluster(store, GPU, {m.name: m.slo for m in models}, nodes=1, gpus_per_node=2)
    policy = make_policy("festina", PolicyContext(store, GPU))
    return PolicyRouter(policy, cluster, starter)


async def post(session: aiohttp.ClientSession, url: str) -> tuple[int, Any, str | None]:
    async with session.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "tell me", "max_tokens": 3}) as r:
        return r.status, await r.json(), r.headers.get("Retry-After")


def test_first_request_waits_for_the_start_then_serves(store: ProfileStore) -> None:
    async def scenario() -> tuple[MemoryRecorder, InProcessStarter, PolicyRouter]:
        async with AsyncExitStack() as stack:
            starter = InProcessStarter(store, stack, load_s=0.3)
            router = make_router(store, starter)
            recorder = MemoryRecorder()
            gateway = Gateway(router, recorder, gateway_models(store, GPU, [MODEL]), GatewayConfig(scale_timeout_s=5))
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                first = await post(session, gw)
                second = await post(session, gw)
            assert first[0] == second[0] == 200 and first[1]["usage"]["completion_tokens"] == 3
            (inst,) = router.cluster.instances()
            assert inst.phase is InstancePhase.READY and inst.in_flight == 0
            return recorder, starter, router

    recorder, starter, router = asyncio.run(scenario())
    assert len(starter.launches) == 1  # the second request found the instance the first started
    launch = starter.launches[0]
    assert (launch.model, launch.gpu_type, len(launch.gpus)) == (MODEL, GPU, 1)
    first, second = recorder.records
    assert first.outcome is second.outcome is Outcome.OK
    assert first.route_s >= 0.3 > second.route_s  # the cold start shows in the first request's routing time
    assert first.ttft_s is not None and first.ttft_s >= 0.3
    assert first.instance_id == second.instance_id == launch.instance_id


def test_timeout_gives_503_and_the_start_goes_on(store: ProfileStore) -> None:
    async def scenario() -> tuple[list[tuple[int, Any, str | None]], InProcessStarter]:
        async with AsyncExitStack() as stack:
            starter = InProcessStarter(store, stack, load_s=0.5)
            gateway = Gateway(make_router(store, starter), MemoryRecorder(), gateway_models(store, GPU, [MODEL]),
                              GatewayConfig(scale_timeout_s=0.1, retry_after_s=1))
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                early = await post(session, gw)
                await asyncio.sleep(0.6)  # the client honours Retry-After; the start finished meanwhile
                late = await post(session, gw)
            return [early, late], starter

    (early, late), starter = asyncio.run(scenario())
    assert early[0] == 503 and early[2] == "1" and early[1]["error"]["type"] == "service_unavailable"
    assert late[0] == 200
    assert len(starter.launches) == 1


def test_failed_start_gives_503_and_frees_the_gpu(store: ProfileStore) -> None:
    async def scenario() -> tuple[tuple[int, Any, str | None], PolicyRouter]:
        async with AsyncExitStack() as stack:
            router = make_router(store, InProcessStarter(store, stack, load_s=0.0, fail=True))
            gateway = Gateway(router, MemoryRecorder(), gateway_models(store, GPU, [MODEL]))
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                return await post(session, gw), router

    (status, answer, _), router = asyncio.run(scenario())
    assert status == 503 and "invalid partition" in answer["error"]["message"]
    assert list(router.cluster.instances()) == [] and sorted(router.cluster.free_gpus()) == [0, 1]


def test_a_request_waiting_on_a_start_takes_another_instance_that_turns_ready(store: ProfileStore) -> None:
    """The start the request waits for hangs (its Slurm job stays pending: a job festinad did not
    know of took the GPU); meanwhile another instance of the model turns ready (an adopted user's
    job). The request goes there within a poll rather than wait out the gateway's timeout."""
    async def scenario() -> tuple[MemoryRecorder, int]:
        async with AsyncExitStack() as stack:
            router = make_router(store, InProcessStarter(store, stack, load_s=60.0))
            recorder = MemoryRecorder()
            gateway = Gateway(router, recorder, gateway_models(store, GPU, [MODEL]), GatewayConfig(scale_timeout_s=20))
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                waiting = asyncio.ensure_future(post(session, gw))
                await asyncio.sleep(0.2)
                (hung,) = router.cluster.instances()
                free = [g for g in (0, 1) if g not in hung.gpus]
                other = router.cluster.add(StartInstance(MODEL, (free[0],)), instance_id=99)
                engine = SimulatedEngine(store, MODEL, GPU, EngineSettings())
                other.endpoint = Endpoint(await stack.enter_async_context(simulated_server(engine)), other.id)
                other.phase = InstancePhase.READY
                other.ready.set_result(other.endpoint)
                status, _, _ = await waiting
                await router.close()
            return recorder, status

    recorder, status = asyncio.run(scenario())
    (record,) = recorder.records
    assert status == 200 and record.outcome is Outcome.OK and record.instance_id == 99
    assert record.route_s < 0.2 + 2 * READY_POLL_S


class KillableStarter(InProcessStarter):
    """``InProcessStarter`` whose servers can be killed (their process gone: connections refused)."""

    def __init__(self, store: ProfileStore, stack: AsyncExitStack, load_s: float):
        super().__init__(store, stack, load_s)
        self.servers: dict[int, AsyncExitStack] = {}

    async def __call__(self, launch: InstanceLaunch) -> Endpoint:
        own = AsyncExitStack()
        self.servers[launch.instance_id] = own
        outer, self.stack = self.stack, own
        try:
            return await super().__call__(launch)
        finally:
            self.stack = outer

    async def kill(self, instance_id: int) -> None:
        await self.servers.pop(instance_id).aclose()

    async def close(self) -> None:
        for own in list(self.servers.values()):
            await own.aclose()


def test_a_request_to_a_dead_instance_waits_for_its_replacement_not_502(store: ProfileStore) -> None:
    """No checker (``on_failed``): the unreachable instance leaves the view at once, its GPU is free, and the
    request that found it dead is placed again: a replacement starts and serves it, as a cold start would."""
    async def scenario() -> tuple[list[int], MemoryRecorder, KillableStarter, PolicyRouter]:
        async with AsyncExitStack() as stack:
            starter = KillableStarter(store, stack, load_s=0.3)
            stack.push_async_callback(starter.close)
            router = make_router(store, starter)
            recorder = MemoryRecorder()
            gateway = Gateway(router, recorder, gateway_models(store, GPU, [MODEL]), GatewayConfig(scale_timeout_s=5))
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                first = await post(session, gw)
                (dead,) = router.cluster.instances()
                await starter.kill(dead.id)
                second = await post(session, gw)
                await router.close()
            return [first[0], second[0]], recorder, starter, router

    statuses, recorder, starter, router = asyncio.run(scenario())
    assert statuses == [200, 200]
    first, second = starter.launches
    assert [i.id for i in router.cluster.instances()] == [second.instance_id]
    assert [r.instance_id for r in recorder.records] == [first.instance_id, second.instance_id]
    assert recorder.records[1].route_s >= 0.3  # it waited for the replacement's start


def test_a_failed_instance_is_routed_to_no_more_and_checked_once(store: ProfileStore) -> None:
    """With a checker (festinad): the instance turns loading (no request gets its dead endpoint) and the
    checker is told once; when the checker finds it gone, a request waiting on it is placed again."""
    async def scenario() -> tuple[list[Any], Any, Endpoint, Endpoint, bool]:
        async with AsyncExitStack() as stack:
            starter = InProcessStarter(store, stack, load_s=0.05)
            router = make_router(store, starter)
            checked: list[Any] = []
            router.on_failed = checked.append
            dead = await router.route(MODEL, 10)
            router.done(dead)
            router.failed(dead)
            router.failed(dead)  # a second request that found it dead: already being checked
            (inst,) = router.cluster.instances()
            phase = inst.phase
            waiting = asyncio.ensure_future(router.route(MODEL, 10))
            await asyncio.sleep(0.3)
            still_waiting = not waiting.done()
            router.cluster.remove(inst)  # the checker found its job gone
            inst.ready.set_exception(NoInstance("gone"))
            replacement = await asyncio.wait_for(waiting, 5)
            await router.close()
            return checked, phase, dead, replacement, still_waiting

    checked, phase, dead, replacement, still_waiting = asyncio.run(scenario())
    assert [i.id for i in checked] == [dead.instance_id] and phase is InstancePhase.LOADING
    assert still_waiting  # the dead endpoint was not given out again
    assert replacement.instance_id != dead.instance_id and replacement.url != dead.url


# -- what the policy learns from the requests it served -----------------------------------------------------


def answered(output_tokens: int, outcome: Outcome = Outcome.OK, prompt_tokens: int = 40) -> CompletionRecord:
    """The gateway's record of a request that ended with ``output_tokens`` generated."""
    served = outcome is not Outcome.NO_INSTANCE
    return CompletionRecord(MODEL, 0.0, outcome, 200 if outcome is Outcome.OK else 503, True, None, None,
                            prompt_tokens, output_tokens, 0.05 if served else None, 0.01 if served else None,
                            0.02 if served else None, 0.3, 0.0, 1.0, 0.1, outcome is Outcome.OK)


def festina_stats(router: PolicyRouter) -> TokenStats:
    assert isinstance(router.policy, FestinaPolicy)
    return router.policy.stats


def test_the_live_policys_typical_output_follows_the_answers_it_served(store: ProfileStore) -> None:
    """festinad's policy starts from the prior's 256-token answers; fed the gateway's records of 16-token
    answers it learns their length (refusals, cut requests and in-flight checkpoints teach none), at its
    next decision: the next placement here."""
    async def scenario() -> tuple[list[float], list[float]]:
        async with AsyncExitStack() as stack:
            router = make_router(store, InProcessStarter(store, stack, load_s=0.0))
            stats = festina_stats(router)
            means = [stats.output_tokens(MODEL)]
            for _ in range(3):
                for outcome in (Outcome.NO_INSTANCE, Outcome.UPSTREAM_ERROR, Outcome.IN_FLIGHT):
                    router.record(answered(2, outcome))
                router.done(await router.route(MODEL, 40))
                means.append(stats.output_tokens(MODEL))  # no completion yet: unchanged
            for _ in range(100):
                router.record(answered(16))
            not_yet = stats.output_tokens(MODEL)
            router.done(await router.route(MODEL, 40))
            await router.close()
            return means, [not_yet, stats.output_tokens(MODEL)]

    means, (before, after) = asyncio.run(scenario())
    assert means == [256.0] * 4 and before == 256.0  # records wait for the policy's next decision
    assert after == pytest.approx(16 + 240 * 0.95 ** 100) and after < 18


async def post_for(session: aiohttp.ClientSession, url: str, max_tokens: int) -> int:
    async with session.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "tell me",
                                                           "max_tokens": max_tokens}) as r:
        return r.status


def test_the_gateways_records_reach_the_policy_through_its_recorder(store: ProfileStore) -> None:
    """As festinad wires it (service.py): the gateway's recorder fans each record out to the database's and
    to the router, so the policy learns the served answers' length from the requests themselves."""
    async def scenario() -> tuple[list[int], MemoryRecorder, PolicyRouter]:
        async with AsyncExitStack() as stack:
            router = make_router(store, InProcessStarter(store, stack, load_s=0.0))
            recorder = MemoryRecorder()
            gateway = Gateway(router, FanOut(recorder, router), gateway_models(store, GPU, [MODEL]),
                              GatewayConfig(scale_timeout_s=5))
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                statuses = [await post_for(session, gw, 16) for _ in range(6)]
            await router.close()
            return statuses, recorder, router

    statuses, recorder, router = asyncio.run(scenario())
    assert statuses == [200] * 6 and [r.output_tokens for r in recorder.records] == [16] * 6
    stats = festina_stats(router)
    assert stats.output_tokens(MODEL) == pytest.approx(16 + 240 * 0.95 ** 5)  # learnt at each next placement
    router.learn()  # the last one at the next tick
    assert stats.output_tokens(MODEL) == pytest.approx(16 + 240 * 0.95 ** 6)
