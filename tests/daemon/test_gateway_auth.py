"""Gateway tenants over real sockets: each refused request gets its status and reaches no instance; served ones
carry their key's user and account; rate limits, revocation within the key cache's TTL, quotas."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from festina_hpc.daemon.auth import AuthConfig, Authenticator, MemoryKeys, Tenant, TokenBucket
from festina_hpc.daemon.bench import stub_upstream
from festina_hpc.daemon.gateway import Gateway, GatewayConfig, GatewayModel
from festina_hpc.daemon.records import MemoryRecorder, Outcome
from festina_hpc.daemon.routing import Endpoint
from festina_hpc.db.errors import DatabaseUnavailable
from festina_hpc.policy.types import Slo
from festina_hpc.serve.openai import ApiError
from festina_hpc.serve.server import running_app

LLAMA, MISTRAL = "llama-3.1-8b", "mistral-7b"
MODELS = [GatewayModel(LLAMA, Slo(ttft_s=5.0, tbt_s=5.0), ("llama3.1-8b",)), GatewayModel(MISTRAL, Slo(5.0, 5.0))]


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class CountingRouter:
    """Routes to one upstream for every model, remembering which models were routed, in order."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.url = ""  # the upstream's, once it runs
        self.routed: list[str] = []
        self.hold = hold  # the first route waits for it (a starting instance)

    async def route(self, model: str, prompt_tokens: int) -> Endpoint:
        first = not self.routed
        self.routed.append(model)
        if first and self.hold is not None:
            await self.hold.wait()
        return Endpoint(self.url, instance_id=7)

    def done(self, endpoint: Endpoint) -> None:
        pass


class FixedUsage:
    def __init__(self, used_j: Mapping[str, float]) -> None:
        self.used_j = dict(used_j)

    def energy_by_account_j(self, since: datetime) -> Mapping[str, float]:
        return dict(self.used_j)  # what the database said then


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(session: aiohttp.ClientSession, gw: str, model: str = LLAMA,
               headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    async with session.post(f"{gw}/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 4},
                            headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


def serve(keys: MemoryKeys, scenario: Any, clock: Clock | None = None, usage: FixedUsage | None = None,
          router: CountingRouter | None = None, **auth: Any) -> tuple[Any, MemoryRecorder, CountingRouter]:
    """Run ``scenario(session, gateway_url)`` against a gateway with ``keys`` in front of a stub upstream."""
    recorder = MemoryRecorder()
    router = router or CountingRouter()

    async def main() -> Any:
        async with running_app(stub_upstream(4)) as upstream:
            router.url = upstream
            authenticator = Authenticator(keys, AuthConfig(**{"key_cache_ttl_s": 0.0, **auth}), usage,
                                          clock=clock or Clock())
            gateway = Gateway(router, recorder, MODELS, GatewayConfig(scale_timeout_s=5.0), auth=authenticator)
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                return await scenario(session, gw)

    result = asyncio.run(main())
    return result, recorder, router


@pytest.fixture
def keys() -> MemoryKeys:
    return MemoryKeys()


@pytest.mark.parametrize("case, status, code", [
    ("no key", 401, "invalid_api_key"),
    ("not a bearer token", 401, "invalid_api_key"),
    ("not a festina key", 401, "invalid_api_key"),
    ("unknown key", 401, "invalid_api_key"),
    ("revoked key", 401, "invalid_api_key"),
    ("expired key", 401, "invalid_api_key"),
    ("key for another model", 403, "model_not_allowed"),
])
def test_refused_requests_get_their_status_and_are_not_served(keys: MemoryKeys, case: str, status: int,
                                                             code: str) -> None:
    good = keys.add("alice", "proj1")
    revoked = keys.add("alice", "proj1")
    keys.revoke(revoked)
    expired = keys.add("alice", "proj1", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    mistral_only = keys.add("bob", "proj2", models=(MISTRAL,))
    headers = {"no key": {}, "not a bearer token": {"Authorization": f"Basic {good}"},
               "not a festina key": bearer("unused"), "unknown key": bearer("fk_" + "x" * 43),
               "revoked key": bearer(revoked), "expired key": bearer(expired),
               "key for another model": bearer(mistral_only)}[case]

    async def scenario(session: aiohttp.ClientSession, gw: str) -> Any:
        return await post(session, gw, headers=headers), await post(session, gw, headers=bearer(good))

    ((got, answer, resp_headers), (ok, _, _)), recorder, router = serve(keys, scenario)
    assert (got, answer["error"]["code"]) == (status, code), answer
    if status == 401:
        assert resp_headers["WWW-Authenticate"] == "Bearer"
    assert ok == 200  # the same gateway serves a good key
    assert router.routed == [LLAMA]  # the refused request reached no instance ...
    assert [(r.user_name, r.account) for r in recorder.records] == [("alice", "proj1")]  # ... and left no record


def test_a_burst_over_the_rate_limit_gets_429_with_retry_after(keys: MemoryKeys) -> None:
    token = keys.add("alice", "proj1", rate_limit_per_s=2.0)
    clock = Clock()  # frozen: the bucket does not refill during the burst

    async def scenario(session: aiohttp.ClientSession, gw: str) -> Any:
        burst = [await post(session, gw, headers=bearer(token)) for _ in range(5)]
        clock.now_s += 0.5  # one request's worth refilled
        return burst, await post(session, gw, headers=bearer(token))

    (burst, after), recorder, router = serve(keys, scenario, clock)
    assert [status for status, _, _ in burst] == [200, 200, 429, 429, 429]
    assert {headers["Retry-After"] for _, _, headers in burst[2:]} == {"1"}
    assert burst[2][1]["error"]["code"] == "rate_limit_exceeded"
    assert after[0] == 200
    assert len(router.routed) == len(recorder.records) == 3


def test_served_requests_carry_their_tenant(keys: MemoryKeys) -> None:
    alice, bob = keys.add("alice", "proj1"), keys.add("bob", "proj2", models=(MISTRAL,))

    async def scenario(session: aiohttp.ClientSession, gw: str) -> Any:
        statuses = [(await post(session, gw, LLAMA, bearer(alice)))[0],
                    (await post(session, gw, MISTRAL, bearer(bob)))[0]]
        async with session.get(f"{gw}/v1/models", headers=bearer(bob)) as resp:
            listed = [m["id"] for m in (await resp.json())["data"]]
        async with session.get(f"{gw}/v1/models") as resp:
            keyless = resp.status
        async with session.get(f"{gw}/health") as resp:
            health = resp.status
        return statuses, listed, keyless, health

    (statuses, listed, keyless, health), recorder, _ = serve(keys, scenario)
    assert statuses == [200, 200]
    assert [(r.model, r.user_name, r.account, r.api_key_id, r.outcome) for r in recorder.records] == [
        (LLAMA, "alice", "proj1", 1, Outcome.OK), (MISTRAL, "bob", "proj2", 2, Outcome.OK)]
    assert listed == [MISTRAL]  # a key sees the models it may call
    assert (keyless, health) == (401, 200)


def test_an_open_gateway_serves_keyless_requests_as_its_default_tenant_but_refuses_bad_keys(
        keys: MemoryKeys) -> None:
    async def scenario(session: aiohttp.ClientSession, gw: str) -> Any:
        return [(await post(session, gw, headers=headers))[0] for headers in [
            {}, bearer("unused"),  # what an OpenAI client sends without a key: no key
            bearer("fk_" + "y" * 43), bearer("fk_short"), {"Authorization": "Basic fk_x"}]]

    statuses, recorder, _ = serve(keys, scenario, require_keys=False, default_user="lab", default_account="open")
    assert statuses == [200, 200, 401, 401, 401]
    assert [(r.user_name, r.account, r.api_key_id) for r in recorder.records] == [("lab", "open", None)] * 2


def test_revocation_takes_effect_within_the_key_cache_ttl(keys: MemoryKeys) -> None:
    token = keys.add("alice", "proj1")
    clock = Clock()

    async def scenario(session: aiohttp.ClientSession, gw: str) -> Any:
        statuses = [(await post(session, gw, headers=bearer(token)))[0]]
        keys.revoke(token)
        clock.now_s += 9.9  # still the cached answer
        statuses.append((await post(session, gw, headers=bearer(token)))[0])
        clock.now_s += 0.1  # the TTL is up: looked up again
        statuses.append((await post(session, gw, headers=bearer(token)))[0])
        return statuses

    statuses, _, _ = serve(keys, scenario, clock, key_cache_ttl_s=10.0)
    assert statuses == [200, 200, 401]


def test_over_quota_refused(keys: MemoryKeys) -> None:
    spender, saver = keys.add("alice", "proj1"), keys.add("bob", "proj2")
    usage = FixedUsage({"proj1": 5000.0, "proj2": 100.0})

    async def scenario(session: aiohttp.ClientSession, gw: str) -> Any:
        return await post(session, gw, headers=bearer(spender)), await post(session, gw, headers=bearer(saver))

    ((refused, answer, headers), (served, _, _)), recorder, router = serve(
        keys, scenario, usage=usage, account_energy_quota_j_per_day={"proj1": 4000.0, "proj2": 4000.0})
    assert (refused, answer["error"]["code"], served) == (429, "energy_quota_exceeded", 200)
    assert "proj1" in answer["error"]["message"] and "4000 J per day" in answer["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 86_400  # until the next UTC day
    assert [r.account for r in recorder.records] == ["proj2"] and router.routed == [LLAMA]


def test_over_quota_deprioritized_waits_behind_normal_requests(keys: MemoryKeys) -> None:
    normal, over = keys.add("bob", "proj2"), keys.add("alice", "proj1")
    usage = FixedUsage({"proj1": 5000.0})
    hold = asyncio.Event()
    router = CountingRouter(hold)

    async def scenario(session: aiohttp.ClientSession, gw: str) -> Any:
        first = asyncio.create_task(post(session, gw, LLAMA, bearer(normal)))  # waits for a starting instance
        while not router.routed:
            await asyncio.sleep(0.01)
        low = asyncio.create_task(post(session, gw, MISTRAL, bearer(over)))
        await asyncio.sleep(0.3)
        waiting = list(router.routed)  # the low-priority request has not reached the router
        hold.set()
        return waiting, (await first)[0], (await low)[0]

    (waiting, first, low), recorder, _ = serve(keys, scenario, usage=usage, router=router,
                                               account_energy_quota_j_per_day={"proj1": 4000.0},
                                               over_quota="deprioritize")
    assert waiting == [LLAMA]
    assert (first, low) == (200, 200)  # deprioritized, still served
    assert router.routed == [LLAMA, MISTRAL]


@pytest.mark.parametrize("rate_per_s, times_s, expected", [
    (2.0, [0, 0, 0], [0.0, 0.0, 0.5]),  # holds two, then one every 0.5 s
    (0.5, [0, 0, 2.0], [0.0, 2.0, 0.0]),  # holds one (at least one), refills in 2 s
    (10.0, [0] * 11, [0.0] * 10 + [pytest.approx(0.1)]),
])
def test_token_bucket(rate_per_s: float, times_s: list[float], expected: list[float]) -> None:
    bucket = TokenBucket(rate_per_s, 0.0)
    assert [bucket.take(t) for t in times_s] == expected


def test_a_key_store_that_fails_is_503_not_served(keys: MemoryKeys) -> None:
    token = keys.add("alice", "proj1")

    def broken(key_hash: str) -> None:
        raise DatabaseUnavailable("database sqlite:///gone.db does not answer")

    keys.find = broken  # type: ignore[method-assign, assignment]

    async def scenario(session: aiohttp.ClientSession, gw: str) -> Any:
        return await post(session, gw, headers=bearer(token))

    (status, answer, headers), recorder, router = serve(keys, scenario)
    assert (status, headers["Retry-After"]) == (503, "5") and "cannot check the API key" in answer["error"]["message"]
    assert router.routed == [] and recorder.records == []


def test_quota_usage_is_reread_each_refresh_period_and_each_new_day(keys: MemoryKeys) -> None:
    usage = FixedUsage({"proj1": 100.0})
    reads: list[datetime] = []
    read = usage.energy_by_account_j

    def counted(since: datetime) -> Mapping[str, float]:
        reads.append(since)
        return read(since)

    usage.energy_by_account_j = counted  # type: ignore[method-assign]
    clock, wall = Clock(), [86_400 * 20_000 + 3600.0]  # 01:00 UTC on some day
    auth = Authenticator(keys, AuthConfig(account_energy_quota_j_per_day={"proj1": 1000.0}, quota_refresh_s=60.0),
                         usage, clock=clock, wall_clock=lambda: wall[0])
    tenant = Tenant("alice", "proj1", key_id=1)

    async def admit() -> int:
        try:
            await auth.admit(tenant, LLAMA)
            return 200
        except ApiError as exc:
            return exc.status

    async def scenario() -> list[int]:
        statuses = [await admit()]
        usage.used_j["proj1"] = 2000.0  # over, but not yet read
        clock.now_s += 30
        statuses.append(await admit())
        clock.now_s += 30  # the period is up
        statuses.append(await admit())
        wall[0] += 86_400  # a new UTC day: read again at once, counting from its 00:00
        usage.used_j["proj1"] = 0.0
        statuses.append(await admit())
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 429, 200]
    day = datetime.fromtimestamp(86_400 * 20_000, UTC)
    assert reads == [day, day, day + timedelta(days=1)]
