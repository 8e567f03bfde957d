"""The simulated model server over real sockets: API shapes, pacing against the profile, settings, metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.engine import filler_token
from festina_hpc.serve.server import simulated_server
from tests.serve.conftest import GPU, MODEL, make_engine, stream, words

TIME_SCALE = 3.0  # ~40 ms steps, so timer and HTTP jitter (a few ms) stay small against them


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_completion_streamed_and_not(store: ProfileStore) -> None:
    async def scenario() -> None:
        async with simulated_server(make_engine(store)) as url, aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/completions",
                                    json={"model": "Meta-Llama-3.1-8B-Instruct", "prompt": [1, 2, 3],
                                          "max_tokens": 3}) as resp:
                assert resp.status == 200
                answer = await resp.json()
            assert answer["object"] == "text_completion" and answer["model"] == MODEL
            assert answer["choices"][0]["text"] == "".join(filler_token(i) for i in range(3))
            assert answer["choices"][0]["finish_reason"] == "length"
            assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
            got = await stream(session, url, {"model": MODEL, "prompt": "a b c d", "max_tokens": 4,
                                              "stream_options": {"include_usage": True}})
            assert got.status == 200 and got.done
            assert got.text == "".join(filler_token(i) for i in range(4))
            assert [e["choices"][0]["finish_reason"] for e in got.events[:4]] == [None, None, None, "length"]
            assert got.events[-1]["choices"] == [] and got.events[-1]["usage"]["prompt_tokens"] == 4
            async with session.get(f"{url}/v1/models") as resp:
                assert [m["id"] for m in (await resp.json())["data"]] == [MODEL]
            async with session.get(f"{url}/health") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"

    run(scenario())


@pytest.mark.parametrize("body, status, param", [
    ({"model": "mistral-7b", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": 7}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 100_000_000, "stream": True}, 400, "max_tokens"),  # > context
])
def test_errors_in_openai_shape(store: ProfileStore, body: dict[str, Any], status: int, param: str) -> None:
    async def scenario() -> None:
        async with simulated_server(make_engine(store)) as url, aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                assert resp.status == status
                assert (await resp.json())["error"]["param"] == param

    run(scenario())


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/v1/completions", b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "levels deep"),
    ("POST", "/v1/completions", b"x" * (2 << 20), 413, "body size"),
    ("GET", "/nothing", None, 404, "no route GET /nothing"),
    ("DELETE", "/admin/settings", None, 405, "DELETE is not allowed on /admin/settings"),
])
def test_aiohttp_errors_and_deep_json_in_openai_shape(store: ProfileStore, method: str, path: str,
                                                      body: bytes | None, status: int, message: str) -> None:
    async def scenario() -> tuple[int, dict[str, Any]]:
        async with simulated_server(make_engine(store)) as url, aiohttp.ClientSession() as session:
            async with session.request(method, f"{url}{path}", data=body) as resp:
                return resp.status, await resp.json()

    got, answer = run(scenario())
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"} and message in answer["error"]["message"]


def expected_times(store: ProfileStore, prompt: int, outputs: int, sm_pct: float = 100.0,
                   clock_mhz: int | None = None) -> tuple[float, float]:
    """(TTFT, mean TBT) of one request alone, from the profile, in model seconds."""
    ttft = store.predict(GPU, MODEL, "prefill", 1, prompt, sm_pct, clock_mhz, clamp=True).latency_s
    steps = [store.predict(GPU, MODEL, "decode", 1, prompt + k, sm_pct, clock_mhz, clamp=True).latency_s
             for k in range(1, outputs)]
    return ttft, sum(steps) / len(steps)


def assert_close(measured_s: float, expected_s: float) -> None:
    # 10% plus 5 ms: the server's timer overshoot and the client's HTTP overhead on a busy CI machine.
    assert abs(measured_s - expected_s) <= 0.10 * expected_s + 0.005, (measured_s, expected_s)


def test_ttft_and_tbt_track_the_profile_and_settings_apply(store: ProfileStore) -> None:
    prompt, outputs = 512, 6
    fast_ttft, fast_tbt = expected_times(store, prompt, outputs, sm_pct=30)
    slow_ttft, slow_tbt = expected_times(store, prompt, outputs, sm_pct=30, clock_mhz=900)
    assert slow_ttft > 1.5 * fast_ttft  # the clock makes a measurable difference

    async def scenario() -> None:
        engine = make_engine(store, time_scale=TIME_SCALE, sm_pct=30)  # the share it starts with
        async with simulated_server(engine) as url, aiohttp.ClientSession() as session:
            request = {"model": MODEL, "prompt": words(prompt), "max_tokens": outputs}
            fast = await stream(session, url, request)
            assert_close(fast.ttft_s, TIME_SCALE * fast_ttft)
            assert_close(fast.tbt_mean_s, TIME_SCALE * fast_tbt)
            # Its own share again is no change, so it is accepted with the clock.
            async with session.post(f"{url}/admin/settings", json={"sm_pct": 30, "clock_mhz": 900}) as resp:
                assert resp.status == 200
                assert (await resp.json())["pending"]["clock_mhz"] == 900
            slow = await stream(session, url, request)
            assert_close(slow.ttft_s, TIME_SCALE * slow_ttft)
            assert_close(slow.tbt_mean_s, TIME_SCALE * slow_tbt)
            async with session.get(f"{url}/admin/settings") as resp:
                assert (await resp.json())["settings"] == {"sm_pct": 30.0, "clock_mhz": 900, "batch_cap": 256,
                                                               "chunk_tokens": 2048}
            async with session.post(f"{url}/admin/settings", json={"clock_mhz": 901}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["param"] == "clock_mhz"
            async with session.post(f"{url}/admin/settings", json={"power_w": 300}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["param"] == "power_w"

    run(scenario())


def test_a_new_sm_share_is_refused_and_the_engine_keeps_its_own_while_clock_and_batch_cap_apply(
        store: ProfileStore) -> None:
    prompt, outputs = 512, 4
    ttft_at_start, _ = expected_times(store, prompt, outputs, sm_pct=30, clock_mhz=900)
    ttft_if_changed, _ = expected_times(store, prompt, outputs, sm_pct=60, clock_mhz=900)
    assert ttft_at_start > 1.5 * ttft_if_changed  # pacing tells the two shares apart

    async def scenario() -> None:
        engine = make_engine(store, time_scale=TIME_SCALE, sm_pct=30)
        async with simulated_server(engine) as url, aiohttp.ClientSession() as session:
            async with session.post(f"{url}/admin/settings", json={"sm_pct": 60, "clock_mhz": 900}) as resp:
                assert resp.status == 409
                error = (await resp.json())["error"]
            assert error["param"] == "sm_pct" and "\n" not in error["message"]
            assert error["message"].startswith("sm_pct = 60") and "fixed at start" in error["message"]
            assert "new instance" in error["message"]
            # Refused as a whole: the clock of the same call did not apply either.
            async with session.get(f"{url}/admin/settings") as resp:
                assert (await resp.json()) == {"settings": {"sm_pct": 30.0, "clock_mhz": 1980, "batch_cap": 256,
                                                            "chunk_tokens": 2048}, "pending": None}
            async with session.post(f"{url}/admin/settings", json={"clock_mhz": 900, "batch_cap": 8}) as resp:
                assert resp.status == 200
            async with session.post(f"{url}/admin/settings", json={"sm_pct": "half"}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["param"] == "sm_pct"
            got = await stream(session, url, {"model": MODEL, "prompt": words(prompt), "max_tokens": outputs})
            assert_close(got.ttft_s, TIME_SCALE * ttft_at_start)  # paced at the share it started with
            async with session.get(f"{url}/health") as resp:
                health = await resp.json()
            assert (health["sm_pct"], health["clock_mhz"], health["batch_cap"]) == (30.0, 900, 8)
        assert engine.settings.sm_pct == 30.0

    run(scenario())


def test_batch_cap_queues_the_second_request(store: ProfileStore) -> None:
    async def scenario() -> None:
        async with simulated_server(make_engine(store, time_scale=2.0, batch_cap=1)) as url, \
                aiohttp.ClientSession() as session:
            request = {"model": MODEL, "prompt": words(128), "max_tokens": 4}
            first, second = await asyncio.gather(stream(session, url, request), stream(session, url, request))
            # The second is admitted only when the first has finished: its first token comes after the
            # first request's last.
            later, earlier = (second, first) if second.token_times_s[0] > first.token_times_s[0] else (first, second)
            assert later.token_times_s[0] > earlier.token_times_s[-1]

    run(scenario())


def test_metrics_count_tokens_time_and_energy(store: ProfileStore) -> None:
    async def scenario() -> str:
        engine = make_engine(store)
        async with simulated_server(engine) as url, aiohttp.ClientSession() as session:
            await stream(session, url, {"model": MODEL, "prompt": words(200), "max_tokens": 5})
            await asyncio.sleep(0.05)
            async with session.get(f"{url}/metrics") as resp:
                assert resp.status == 200 and resp.content_type == "text/plain"
                return await resp.text()

    text = run(scenario())
    values = {sample.name + sample.labels.get("state", ""): sample.value
              for family in text_string_to_metric_families(text) for sample in family.samples}
    assert all(sample.labels["model"] == MODEL for family in text_string_to_metric_families(text)
               for sample in family.samples)
    assert values["festina_serve_prompt_tokens_total"] == 200
    assert values["festina_serve_generation_tokens_total"] == 5
    assert values["festina_serve_requests_finished_total"] == 1
    busy = values["festina_serve_busy_seconds_total"]
    ttft, tbt = expected_times(store, 200, 5)
    assert busy == pytest.approx(ttft + 4 * tbt, rel=0.02)
    assert values["festina_serve_idle_seconds_total"] > 0.04
    idle_w = store.gpu(GPU).idle_w
    assert values["festina_serve_energy_joules_totalbusy"] > idle_w * busy  # serving draws more than idling
    assert values["festina_serve_energy_joules_totalidle"] == pytest.approx(
        idle_w * values["festina_serve_idle_seconds_total"], rel=0.05)


def test_chunked_prefill_paces_each_chunk_and_health_reports_the_settings(store: ProfileStore) -> None:
    prompt, chunk = 600, 256
    expected_ttft = sum(store.predict(GPU, MODEL, "prefill", 1, take, 100.0, None, clamp=True).latency_s
                        for take in (256, 256, 88))

    async def scenario() -> None:
        engine = make_engine(store, time_scale=TIME_SCALE)
        async with simulated_server(engine) as url, aiohttp.ClientSession() as session:
            async with session.post(f"{url}/admin/settings", json={"chunk_tokens": chunk}) as resp:
                assert resp.status == 200
            got = await stream(session, url, {"model": MODEL, "prompt": words(prompt), "max_tokens": 2})
            assert_close(got.ttft_s, TIME_SCALE * expected_ttft)
            async with session.get(f"{url}/health") as resp:
                health = await resp.json()
            assert health["chunk_tokens"] == chunk and health["sm_pct"] == 100.0 and health["batch_cap"] == 256
            assert health["pid"] > 0 and health["arrival_rate_per_s"] > 0 and health["pending_prompt_tokens"] == 0
            async with session.post(f"{url}/admin/settings", json={"chunk_tokens": 0}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["param"] == "chunk_tokens"

    run(scenario())


SECRET = "s3cret-of-this-instance-0123456789"
COMPLETION = {"model": MODEL, "prompt": [1, 2], "max_tokens": 2}
GUARDED = [("post", "/v1/completions", COMPLETION), ("get", "/v1/models", None),
           ("post", "/admin/settings", {"batch_cap": 1}), ("get", "/admin/settings", None),
           ("get", "/metrics", None)]


@pytest.mark.parametrize("method, path, body", GUARDED)
@pytest.mark.parametrize("case, headers, status", [
    ("no secret", {}, 401),
    ("wrong secret", {"Authorization": "Bearer not-the-secret-at-all-0000"}, 401),
    ("secret as a prefix", {"Authorization": f"Bearer {SECRET}x"}, 401),
    ("another scheme", {"Authorization": f"Basic {SECRET}"}, 401),
    ("the secret", {"Authorization": f"Bearer {SECRET}"}, 200),
])
def test_a_server_with_a_secret_answers_only_its_holder(store: ProfileStore, method: str, path: str,
                                                       body: dict[str, Any] | None, case: str,
                                                       headers: dict[str, str], status: int) -> None:
    async def scenario() -> None:
        engine = make_engine(store)
        async with simulated_server(engine, secret=SECRET) as url, aiohttp.ClientSession() as session:
            async with session.request(method, f"{url}{path}", json=body, headers=headers) as resp:
                assert resp.status == status, case
                if status == 401:
                    error = (await resp.json())["error"]
                    assert error["type"] == "authentication_error" and SECRET not in error["message"]
            if path == "/admin/settings" and method == "post":
                # A refused change leaves the instance as it was.
                applied = engine.pending_settings or engine.settings
                assert (applied.batch_cap == 1) == (status == 200)

    run(scenario())


def test_health_without_the_secret_says_only_whether_it_serves(store: ProfileStore) -> None:
    async def scenario() -> None:
        async with simulated_server(make_engine(store), secret=SECRET) as url, aiohttp.ClientSession() as session:
            holder = {"Authorization": f"Bearer {SECRET}"}
            pending = asyncio.ensure_future(session.post(f"{url}/v1/completions", headers=holder,
                                                         json={**COMPLETION, "max_tokens": 30}))
            await asyncio.sleep(0.1)  # in flight: a queue the open answer must not show
            async with session.get(f"{url}/health") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ok", "model": MODEL}
            async with session.get(f"{url}/health", headers=holder) as resp:
                full = await resp.json()
            assert full["running"] + full["waiting"] == 1 and full["in_flight"] == 1
            assert {"arrival_rate_per_s", "pending_prompt_tokens", "pid", "batch_cap"} <= set(full)
            (await pending).release()

    run(scenario())


def test_a_server_without_a_secret_stays_open(store: ProfileStore) -> None:
    async def scenario() -> None:
        async with simulated_server(make_engine(store)) as url, aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/completions", json=COMPLETION) as resp:
                assert resp.status == 200
            async with session.get(f"{url}/health") as resp:
                assert "running" in await resp.json()

    run(scenario())


@pytest.mark.parametrize("secret, warned", [(None, True), (SECRET, False)])
def test_a_server_started_without_a_secret_says_once_that_it_is_open(store: ProfileStore,
                                                                     caplog: pytest.LogCaptureFixture,
                                                                     secret: str | None, warned: bool) -> None:
    from festina_hpc.serve.server import run_server

    async def scenario() -> None:
        stop = asyncio.Event()
        await run_server(make_engine(store), "127.0.0.1", 0, stop, lambda url: stop.set(), drain_s=0.0,
                         secret=secret)

    with caplog.at_level("WARNING", logger="festina_hpc.serve.server"):
        run(scenario())
    opened = [r for r in caplog.records if "answers anyone" in r.getMessage()]
    assert len(opened) == (1 if warned else 0)
