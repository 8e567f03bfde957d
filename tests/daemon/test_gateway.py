"""The gateway over real sockets: proxying to simulated servers, what it records, and its error answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import Counter
from dataclasses import replace
from typing import Any, cast

import aiohttp
import pytest

from festina_hpc.daemon.admin_api import add_admin_routes
from festina_hpc.daemon.catalogue_models import catalogue_gateway_models
from festina_hpc.daemon.gateway import Gateway, GatewayConfig, gateway_models
from festina_hpc.daemon.records import MemoryRecorder, Outcome
from festina_hpc.daemon.routing import Endpoint, StaticRouter
from festina_hpc.db.catalogue import CatalogueEntry
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.engine import filler_token
from festina_hpc.serve.server import running_app, simulated_server
from tests.serve.conftest import GPU, MODEL, make_engine, stream, words
from tests.serve.conftest import stream as stream_

TIME_SCALE = 3.0


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make_gateway(store: ProfileStore, router: Any, recorder: MemoryRecorder, **config: Any) -> Gateway:
    return Gateway(router, recorder, gateway_models(store, GPU, [MODEL, "mistral-7b"]), GatewayConfig(**config))


def test_proxies_to_two_servers_and_records_timings(store: ProfileStore) -> None:
    prompt, outputs = 256, 5

    async def scenario() -> MemoryRecorder:
        recorder = MemoryRecorder()
        async with simulated_server(make_engine(store, TIME_SCALE)) as url_a, \
                simulated_server(make_engine(store, TIME_SCALE)) as url_b:
            gateway = make_gateway(store, StaticRouter({MODEL: [url_a, url_b]}), recorder)
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                request = {"model": "llama3.1-8b", "prompt": words(prompt), "max_tokens": outputs}
                streamed = [await stream(session, gw, request) for _ in range(2)]
                for got in streamed:
                    assert got.status == 200 and got.done
                    assert got.text == "".join(filler_token(i) for i in range(outputs))
                    assert all(e["choices"] for e in got.events)  # no usage chunk: the client did not ask
                with_usage = await stream(session, gw, {**request, "stream_options": {"include_usage": True}})
                assert with_usage.events[-1]["usage"]["completion_tokens"] == outputs
                async with session.post(f"{gw}/v1/completions", json=request) as resp:
                    assert resp.status == 200
                    answer = await resp.json()
                assert answer["choices"][0]["text"] == streamed[0].text
                assert answer["choices"][0]["finish_reason"] == "length"
                assert answer["usage"] == {"prompt_tokens": prompt, "completion_tokens": outputs,
                                           "total_tokens": prompt + outputs}
                async with session.get(f"{gw}/v1/models") as resp:
                    assert [m["id"] for m in (await resp.json())["data"]] == ["llama-3.1-8b", "mistral-7b"]
        return recorder

    records = run(scenario()).records
    assert len(records) == 4
    assert Counter(r.endpoint for r in records).most_common()[0][1] == 2  # round-robin over both servers
    assert len({r.endpoint for r in records}) == 2
    ttft = store.predict(GPU, MODEL, "prefill", 1, prompt).latency_s * TIME_SCALE
    tbt = store.predict(GPU, MODEL, "decode", 1, prompt + 2).latency_s * TIME_SCALE
    for r in records:
        assert (r.model, r.outcome, r.status, r.prompt_tokens, r.output_tokens) == (MODEL, Outcome.OK, 200, prompt,
                                                                                   outputs)
        assert r.ttft_s is not None and r.tbt_mean_s is not None and r.tbt_max_s is not None
        assert abs(r.ttft_s - ttft) <= 0.1 * ttft + 0.005
        assert abs(r.tbt_mean_s - tbt) <= 0.1 * tbt + 0.005
        assert r.tbt_max_s >= r.tbt_mean_s
        assert r.e2e_s >= r.ttft_s + (outputs - 1) * r.tbt_mean_s * 0.99
        # default SLOs are 5x the unloaded latencies; time-scaled 3x, an unloaded request still meets them
        assert r.slo_met and r.ttft_slo_s > r.ttft_s
    assert [r.stream for r in records] == [True, True, True, False]


def test_catalogue_names_are_listed_and_echoed_profile_names_accepted(store: ProfileStore) -> None:
    """Users call the catalogue's names; an instance answers under the profile's; the client sees the former."""
    entries = [CatalogueEntry("llama8b", MODEL, GPU, "vllm", 5.0, 1.0),
               CatalogueEntry("mistral", "mistral-7b", GPU, "vllm", 5.0, 1.0)]
    served = catalogue_gateway_models(entries, store, GPU)
    assert [(m.name, m.public) for m in served] == [(MODEL, "llama8b"), ("mistral-7b", "mistral")]

    async def scenario() -> None:
        recorder = MemoryRecorder()
        async with simulated_server(make_engine(store, 0.01)) as url:
            gateway = Gateway(StaticRouter({MODEL: [url]}), recorder, served, GatewayConfig())
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                async with session.get(f"{gw}/v1/models") as resp:
                    assert [m["id"] for m in (await resp.json())["data"]] == ["llama8b", "mistral"]
                for called in ("llama8b", MODEL, "LLAMA8B", "meta-llama/Meta-Llama-3.1-8B-Instruct"):
                    request = {"model": called, "prompt": words(8), "max_tokens": 3}
                    got = await stream(session, gw, {**request, "stream_options": {"include_usage": True}})
                    assert got.status == 200 and got.done and len(got.events) == 4, called
                    assert {e["model"] for e in got.events} == {"llama8b"}, called  # the usage chunk too
                    async with session.post(f"{gw}/v1/completions", json=request) as resp:
                        assert resp.status == 200 and (await resp.json())["model"] == "llama8b", called
                async with session.post(f"{gw}/v1/completions", json={"model": "gpt-9", "prompt": "x"}) as resp:
                    assert resp.status == 404
                    assert "(known: llama8b, mistral)" in (await resp.json())["error"]["message"]
                async with session.post(f"{gw}/v1/completions",
                                        json={"model": "llama8b", "prompt": "x", "max_tokens": 10 ** 7}) as resp:
                    assert resp.status == 400 and "llama8b's limit" in (await resp.json())["error"]["message"]
        # What is recorded (and charged) stays under the canonical name, the one instances run.
        assert {r.model for r in recorder.records} == {MODEL} and len(recorder.records) == 8

    run(scenario())


class NeverReady:
    """A router whose instance never comes up."""

    def __init__(self) -> None:
        self.done_calls = 0

    async def route(self, model: str, prompt_tokens: int) -> Endpoint:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    def done(self, endpoint: Endpoint) -> None:
        self.done_calls += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("case, router, body, status, param", [
    ("unknown model", None, {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("bad field", None, {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("bad json", None, b"{", 400, None),
    ("no instance in time", NeverReady(), {"model": MODEL, "prompt": "x"}, 503, None),
    ("instance down", "down", {"model": MODEL, "prompt": "x", "stream": True}, 503, None),
])
def test_error_answers(store: ProfileStore, case: str, router: Any, body: Any, status: int, param: str | None) -> None:
    if router is None or router == "down":
        router = StaticRouter({MODEL: [f"http://127.0.0.1:{free_port()}"]})

    async def scenario() -> tuple[aiohttp.ClientResponse, dict[str, Any], MemoryRecorder]:
        recorder = MemoryRecorder()
        async with running_app(make_gateway(store, router, recorder, scale_timeout_s=0.2).app()) as gw, \
                aiohttp.ClientSession() as session:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.post(f"{gw}/v1/completions", **kwargs) as resp:
                return resp, await resp.json(), recorder

    resp, answer, recorder = run(scenario())
    assert resp.status == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param
    if status == 503:
        assert resp.headers["Retry-After"] == "10"
        # Its only instance refuses connections: routed again a bounded number of times, then 503 (not 502).
        assert ("could not be reached" if case == "instance down" else "within 0.2 s") in answer["error"]["message"]
        assert [r.outcome for r in recorder.records] == [Outcome.NO_INSTANCE]
        assert not recorder.records[0].slo_met
    elif status == 502:
        assert [(r.outcome, r.status) for r in recorder.records] == [(Outcome.UPSTREAM_ERROR, 502)]
    else:
        assert recorder.records == []  # not a model's request: nothing to account


def nested(depth: int) -> bytes:
    return b'{"model": "%s", "prompt": "x", "user": ' % MODEL.encode() + b"[" * depth + b"]" * depth + b"}"


def limits_cases(store: ProfileStore) -> list[tuple[str, str, str, Any, int, str | None, str]]:
    """(case, method, path, body, status, param, a piece of the message) of requests the gateway refuses."""
    context = store.model(MODEL).max_context_tokens
    return [
        ("max_tokens above the model's limit", "POST", "/v1/completions",
         {"model": MODEL, "prompt": "x", "max_tokens": 100_000_000}, 400, "max_tokens", "max_tokens = 100000000"),
        ("prompt plus max_tokens above the context", "POST", "/v1/completions",
         {"model": MODEL, "prompt": words(context - 10), "max_tokens": 100}, 400, "max_tokens",
         f"prompt ({context - 10} tokens) plus max_tokens (100)"),
        ("JSON nested 1000 deep", "POST", "/v1/completions", nested(1000), 400, None, "1001 levels deep"),
        ("JSON nested 100000 deep", "POST", "/v1/completions", nested(100_000), 400, None, "levels deep"),
        ("body over 1 MiB", "POST", "/v1/completions", b"x" * (2 << 20), 413, None, "body size"),
        ("unknown route", "GET", "/v1/chat/nothing", None, 404, None, "no route GET /v1/chat/nothing"),
        ("wrong method", "GET", "/v1/completions", None, 405, None, "allowed: POST"),
    ]


LIMIT_CASES = ["max_tokens", "context", "nested 1000", "nested 100000", "413", "404", "405"]


@pytest.mark.parametrize("index", range(len(LIMIT_CASES)), ids=LIMIT_CASES)
def test_limits_and_aiohttp_errors_answer_in_the_error_shape(store: ProfileStore, index: int) -> None:
    case, method, path, body, status, param, message = limits_cases(store)[index]
    router = StaticRouter({MODEL: [f"http://127.0.0.1:{free_port()}"]})  # never reached: refused before

    async def scenario() -> tuple[int, str, dict[str, Any]]:
        async with running_app(make_gateway(store, router, MemoryRecorder()).app()) as gw, \
                aiohttp.ClientSession() as session:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
            async with session.request(method, f"{gw}{path}", **kwargs) as resp:
                return resp.status, resp.content_type, await resp.json(content_type=None)

    got, content_type, answer = run(scenario())
    assert (got, content_type) == (status, "application/json"), (case, answer)
    assert set(answer["error"]) == {"message", "type", "param", "code"}, case
    assert answer["error"]["param"] == param, case
    assert message in answer["error"]["message"] and "\n" not in answer["error"]["message"], case


def test_catalogue_output_limit_refuses_what_the_context_allows(store: ProfileStore) -> None:
    model = gateway_models(store, GPU, [MODEL])[0]
    limited = Gateway(StaticRouter({MODEL: [f"http://127.0.0.1:{free_port()}"]}), MemoryRecorder(),
                      [replace(model, max_output_tokens=64)], GatewayConfig())

    async def scenario() -> tuple[int, dict[str, Any]]:
        async with running_app(limited.app()) as gw, aiohttp.ClientSession() as session:
            async with session.post(f"{gw}/v1/completions",
                                    json={"model": MODEL, "prompt": "x", "max_tokens": 65}) as resp:
                return resp.status, await resp.json()

    status, answer = run(scenario())
    assert status == 400
    assert answer["error"]["message"] == "max_tokens = 65 is above llama-3.1-8b's limit of 64 output tokens"


def test_requests_within_the_limits_are_served(store: ProfileStore) -> None:
    context = store.model(MODEL).max_context_tokens
    model = gateway_models(store, GPU, [MODEL])[0]
    assert (model.max_output_tokens, model.context_tokens) == (context, context)

    async def scenario() -> list[int]:
        statuses = []
        async with simulated_server(make_engine(store, 0.01)) as url:
            gateway = make_gateway(store, StaticRouter({MODEL: [url]}), MemoryRecorder())
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                for body in ({"model": MODEL, "prompt": words(8), "max_tokens": 4, "user": nested(30).decode()},
                             {"model": MODEL, "prompt": "[" * 5000, "max_tokens": 2},  # brackets in a string
                             {"model": MODEL, "prompt": list(range(16)), "max_tokens": 2}):
                    async with session.post(f"{gw}/v1/completions", json=body) as resp:
                        statuses.append(resp.status)
        return statuses

    assert run(scenario()) == [200, 200, 200]


@pytest.mark.parametrize("body, message", [
    (b"{", "body is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "request body nests JSON too deeply"),
])
def test_admin_routes_on_the_gateway_answer_in_the_error_shape(store: ProfileStore, body: bytes,
                                                               message: str) -> None:
    async def scenario() -> tuple[int, dict[str, Any]]:
        app = make_gateway(store, StaticRouter({}), MemoryRecorder()).app()
        add_admin_routes(app, cast(Any, None))  # refused before festinad is asked anything
        async with running_app(app) as gw, aiohttp.ClientSession() as session:
            async with session.post(f"{gw}/admin/node-control", data=body) as resp:
                return resp.status, await resp.json()

    assert run(scenario()) == (400, {"error": {"message": message, "type": "invalid_request_error",
                                               "param": None, "code": None}})


async def _stops_after_two_tokens(request: Any) -> Any:
    """An instance that dies mid-stream: two token chunks, then the connection ends without [DONE]."""
    from aiohttp import web

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(2):
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL,
                 "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    await response.write_eof()
    return response


def test_a_stream_cut_by_its_instance_ends_with_an_error_event_and_no_done(store: ProfileStore) -> None:
    from aiohttp import web

    async def scenario() -> tuple[int, list[bytes], MemoryRecorder]:
        recorder = MemoryRecorder()
        instance = web.Application()
        instance.router.add_post("/v1/completions", _stops_after_two_tokens)
        async with running_app(instance) as url:
            gateway = make_gateway(store, StaticRouter({MODEL: [url]}), recorder)
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 800, "stream": True}
                async with session.post(f"{gw}/v1/completions", json=body) as resp:
                    lines = [line.strip() async for line in resp.content if line.strip()]
                    return resp.status, lines, recorder

    status, lines, recorder = run(scenario())
    assert status == 200  # the headers went out with the first token
    assert len(lines) == 3 and b"[DONE]" not in b"".join(lines)
    error = json.loads(lines[-1].removeprefix(b"data: "))
    assert error["error"]["type"] == "upstream_error" and "ended the stream early" in error["error"]["message"]
    assert [(r.outcome, r.output_tokens) for r in recorder.records] == [(Outcome.UPSTREAM_ERROR, 2)]


@contextlib.asynccontextmanager
async def as_festinad_serves(app: Any) -> Any:
    """The app on a socket as festinad's service runs it: a hung-up client does not cancel its handler
    (aiohttp's default; admin handlers must not stop half done)."""
    from aiohttp import web

    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_a_client_that_hangs_up_on_a_non_streamed_request_stops_its_generation(store: ProfileStore) -> None:
    async def scenario() -> tuple[int, MemoryRecorder]:
        recorder = MemoryRecorder()
        async with simulated_server(make_engine(store, 1.0)) as url:
            gateway = make_gateway(store, StaticRouter({MODEL: [url]}), recorder)
            async with as_festinad_serves(gateway.app()) as gw:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 100_000}  # minutes of tokens
                async with aiohttp.ClientSession() as session:
                    task = asyncio.create_task(session.post(f"{gw}/v1/completions", json=body))
                    await asyncio.sleep(0.5)
                    task.cancel()  # the client hangs up
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                in_flight = -1
                async with aiohttp.ClientSession() as session:
                    for _ in range(50):  # within a few steps, not at the end of 100,000 tokens
                        await asyncio.sleep(0.1)
                        async with session.get(f"{url}/health") as resp:
                            in_flight = (await resp.json())["in_flight"]
                        if in_flight == 0 and recorder.records:
                            break
        return in_flight, recorder

    in_flight, recorder = run(scenario())
    assert in_flight == 0
    (record,) = recorder.records
    assert record.outcome is Outcome.CLIENT_GONE and record.output_tokens > 0  # what was served is charged


class ListRouter:
    """Gives ``urls`` in turn, the last one from then on, each after ``wait_s``; records what it is told."""

    def __init__(self, urls: list[str], wait_s: float = 0.0):
        self.urls, self.wait_s = list(urls), wait_s
        self.routed: list[str] = []
        self.failed_urls: list[str] = []
        self.done_urls: list[str] = []

    async def route(self, model: str, prompt_tokens: int) -> Endpoint:
        await asyncio.sleep(self.wait_s)
        url = self.urls.pop(0) if len(self.urls) > 1 else self.urls[0]
        self.routed.append(url)
        return Endpoint(url, instance_id=len(self.routed))

    def done(self, endpoint: Endpoint) -> None:
        self.done_urls.append(endpoint.url)

    def failed(self, endpoint: Endpoint) -> None:
        self.failed_urls.append(endpoint.url)


async def _hangs_up(request: Any) -> Any:
    """An instance that dies as the request arrives: the connection closes before any response header."""
    assert request.transport is not None
    request.transport.close()
    await asyncio.sleep(1)


async def _answers(status: int, request: Any) -> Any:
    from aiohttp import web

    return web.json_response({"error": {"message": "busy", "type": "x", "param": None, "code": None}},
                             status=status)


@contextlib.asynccontextmanager
async def _instance(handler: Any) -> Any:
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    async with running_app(app) as url:
        yield url


@pytest.mark.parametrize("dead", ["refuses connections", "closes before its headers"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_request_whose_instance_cannot_be_reached_is_served_by_the_next(store: ProfileStore, dead: str,
                                                                         stream: bool) -> None:
    async def scenario() -> tuple[int, Any, ListRouter, MemoryRecorder]:
        recorder = MemoryRecorder()
        async with contextlib.AsyncExitStack() as stack:
            dead_url = f"http://127.0.0.1:{free_port()}" if dead == "refuses connections" \
                else await stack.enter_async_context(_instance(_hangs_up))
            alive = await stack.enter_async_context(simulated_server(make_engine(store, TIME_SCALE)))
            router = ListRouter([dead_url, alive])
            async with running_app(make_gateway(store, router, recorder, scale_timeout_s=5).app()) as gw, \
                    aiohttp.ClientSession() as session:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": stream}
                if stream:
                    got = await stream_(session, gw, body)
                    return got.status, got.text, router, recorder
                async with session.post(f"{gw}/v1/completions", json=body) as resp:
                    return resp.status, (await resp.json())["choices"][0]["text"], router, recorder

    status, text, router, recorder = run(scenario())
    assert status == 200 and text == "".join(filler_token(i) for i in range(3))
    dead_url, alive = router.routed
    assert router.failed_urls == [dead_url]  # told once, before the request went elsewhere
    assert router.done_urls == [dead_url, alive]  # every route answer ends with done
    (record,) = recorder.records
    assert (record.outcome, record.status, record.endpoint) == (Outcome.OK, 200, alive)


def test_only_unreachable_instances_until_the_timeout_give_503_with_retry_after(store: ProfileStore) -> None:
    async def scenario() -> tuple[int, Any, str | None, ListRouter]:
        router = ListRouter([f"http://127.0.0.1:{free_port()}"], wait_s=0.15)
        async with running_app(make_gateway(store, router, MemoryRecorder(), scale_timeout_s=0.4).app()) as gw, \
                aiohttp.ClientSession() as session:
            async with session.post(f"{gw}/v1/completions", json={"model": MODEL, "prompt": "x"}) as resp:
                return resp.status, await resp.json(), resp.headers.get("Retry-After"), router

    status, answer, retry_after, router = run(scenario())
    assert (status, retry_after) == (503, "10")
    message = answer["error"]["message"]
    assert "within 0.4 s" in message and "could not be reached" in message
    assert len(router.routed) == len(router.failed_urls) == 2  # the third route ran out of time


def test_only_unreachable_instances_are_retried_a_bounded_number_of_times(store: ProfileStore) -> None:
    from festina_hpc.daemon.gateway import MAX_REROUTES

    async def scenario() -> tuple[int, ListRouter]:
        router = ListRouter([f"http://127.0.0.1:{free_port()}"])
        async with running_app(make_gateway(store, router, MemoryRecorder(), scale_timeout_s=30).app()) as gw, \
                aiohttp.ClientSession() as session:
            async with session.post(f"{gw}/v1/completions", json={"model": MODEL, "prompt": "x"}) as resp:
                return resp.status, router

    status, router = run(scenario())
    assert status == 503 and len(router.routed) == MAX_REROUTES + 1


@pytest.mark.parametrize("status, seen", [(503, 503), (429, 429), (500, 502)])
def test_an_instance_that_answers_is_not_retried(store: ProfileStore, status: int, seen: int) -> None:
    import functools

    async def scenario() -> tuple[int, ListRouter]:
        async with _instance(functools.partial(_answers, status)) as url:
            router = ListRouter([url, f"http://127.0.0.1:{free_port()}"])
            async with running_app(make_gateway(store, router, MemoryRecorder()).app()) as gw, \
                    aiohttp.ClientSession() as session:
                async with session.post(f"{gw}/v1/completions", json={"model": MODEL, "prompt": "x"}) as resp:
                    return resp.status, router

    got, router = run(scenario())
    assert got == seen and len(router.routed) == 1 and router.failed_urls == []


def test_a_stream_already_begun_is_not_retried(store: ProfileStore) -> None:
    from aiohttp import web

    async def scenario() -> tuple[int, list[bytes], ListRouter]:
        instance = web.Application()
        instance.router.add_post("/v1/completions", _stops_after_two_tokens)
        async with running_app(instance) as url, simulated_server(make_engine(store, TIME_SCALE)) as alive:
            router = ListRouter([url, alive])
            async with running_app(make_gateway(store, router, MemoryRecorder()).app()) as gw, \
                    aiohttp.ClientSession() as session:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 800, "stream": True}
                async with session.post(f"{gw}/v1/completions", json=body) as resp:
                    return resp.status, [line.strip() async for line in resp.content if line.strip()], router

    status, lines, router = run(scenario())
    assert status == 200 and b"ended the stream early" in lines[-1]
    assert len(router.routed) == 1 and router.failed_urls == []


async def _stop_mid_stream(store: ProfileStore, recorder: Any, stream_tokens: int, body: dict[str, Any],
                           **config: Any) -> tuple[int, list[bytes], float, int]:
    """A request to a slow instance in flight, then the gateway's runner cleaned up as ``run_festinad`` does on
    SIGTERM (after ``stream_tokens`` lines of a stream, or 0.5 s into another request); returns the client's
    status, the lines it read (a closed stream ends them), how long cleanup took and the instance's requests
    in flight soon after."""
    from aiohttp import web

    async with simulated_server(make_engine(store, 1.0)) as url:
        gateway = Gateway(StaticRouter({MODEL: [url]}), recorder, gateway_models(store, GPU, [MODEL]),
                          GatewayConfig(**config))
        runner = web.AppRunner(gateway.app(), handle_signals=False, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        loop = asyncio.get_running_loop()
        lines: list[bytes] = []
        cleanup: asyncio.Task[None] | None = None
        started_s = loop.time()

        def stop() -> None:
            nonlocal cleanup, started_s
            started_s = loop.time()
            cleanup = asyncio.create_task(runner.cleanup())

        async with aiohttp.ClientSession() as session:
            if not body.get("stream"):
                loop.call_later(0.5, stop)
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
                status = resp.status
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    async for line in resp.content:
                        if line.strip():
                            lines.append(line.strip())
                        if len(lines) == stream_tokens and cleanup is None:
                            stop()
        if cleanup is None:
            stop()
        assert cleanup is not None
        await cleanup
        cleanup_s = loop.time() - started_s
        in_flight = -1
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                async with session.get(f"{url}/health") as resp:
                    in_flight = (await resp.json())["in_flight"]
                if in_flight == 0:
                    break
                await asyncio.sleep(0.1)
        return status, lines, cleanup_s, in_flight


def test_a_stream_in_flight_when_festinad_stops_is_recorded_and_ends_with_an_error_event(store: ProfileStore) -> None:
    recorder = MemoryRecorder()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 100_000, "stream": True}  # minutes of tokens
    status, lines, cleanup_s, in_flight = run(_stop_mid_stream(store, recorder, 3, body, shutdown_s=0.3))
    assert status == 200 and len(lines) > 3 and b"[DONE]" not in b"".join(lines)
    error = json.loads(lines[-1].removeprefix(b"data: "))
    assert error["error"]["type"] == "service_unavailable" and "festinad stopped" in error["error"]["message"]
    (record,) = recorder.records
    tokens = len(lines) - 1
    assert (record.outcome, record.status, record.stream) == (Outcome.GATEWAY_STOPPED, 200, True)
    assert record.output_tokens >= tokens > 3  # what was served is recorded, so charged
    assert cleanup_s < 2.0  # cut after shutdown_s, not after the runner's own 5 s timeout
    assert in_flight == 0  # the instance stopped generating


def test_a_non_streamed_request_in_flight_when_festinad_stops_gets_503_and_is_recorded(
        store: ProfileStore) -> None:
    recorder = MemoryRecorder()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 100_000}
    status, lines, _, in_flight = run(_stop_mid_stream(store, recorder, 0, body, shutdown_s=0.5))
    assert status == 503
    assert json.loads(b"".join(lines))["error"]["type"] == "service_unavailable"
    (record,) = recorder.records
    assert (record.outcome, record.status, record.stream) == (Outcome.GATEWAY_STOPPED, 503, False)
    assert record.output_tokens > 0 and in_flight == 0


def test_requests_that_finish_within_shutdown_s_are_not_cut(store: ProfileStore) -> None:
    recorder = MemoryRecorder()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 20, "stream": True}
    status, lines, _, _ = run(_stop_mid_stream(store, recorder, 2, body, shutdown_s=5.0))
    assert status == 200 and lines[-1] == b"data: [DONE]"
    assert [(r.outcome, r.output_tokens) for r in recorder.records] == [(Outcome.OK, 20)]


def test_requests_in_flight_are_checkpointed_with_an_id_their_final_record_carries(store: ProfileStore) -> None:
    """``in_flight`` (festinad writes it every flush, so a crash leaves the tokens served so far): one record per
    request an instance is answering, with its tokens so far; the request keeps its id to the end."""
    async def scenario() -> tuple[list[Any], list[Any], MemoryRecorder]:
        recorder = MemoryRecorder()
        async with simulated_server(make_engine(store, 1.0)) as url:
            gateway = make_gateway(store, StaticRouter({MODEL: [url]}), recorder)
            async with running_app(gateway.app()) as gw, aiohttp.ClientSession() as session:
                await stream_(session, gw, {"model": MODEL, "prompt": "x", "max_tokens": 4})
                body = {"model": MODEL, "prompt": "x", "max_tokens": 40, "stream": True}
                checkpoints: list[list[Any]] = []
                async with session.post(f"{gw}/v1/completions", json=body) as resp:
                    lines = 0
                    async for line in resp.content:
                        lines += bool(line.strip())
                        if lines in (3, 20) and len(checkpoints) < (1 if lines == 3 else 2):
                            checkpoints.append(gateway.in_flight())
                after = gateway.in_flight()
        return checkpoints, after, recorder

    checkpoints, after, recorder = run(scenario())
    first, second = (c[0] for c in checkpoints)
    assert all(len(c) == 1 for c in checkpoints) and after == []
    assert first.outcome is second.outcome is Outcome.IN_FLIGHT and not first.slo_met
    assert first.request_id is not None and second.request_id == first.request_id
    assert 3 <= first.output_tokens < second.output_tokens < 40
    untouched, final = recorder.records
    assert untouched.request_id is None  # never checkpointed: its row needs no id
    assert (final.outcome, final.output_tokens, final.request_id) == (Outcome.OK, 40, first.request_id)


@pytest.mark.parametrize("payload", [
    b'{"id":"c1","model":"llama-3.1-8b","choices":[{"text":"\\"model\\":\\"llama-3.1-8b\\""}]}',  # compact (vLLM)
    b'{"id": "c1", "model": "llama-3.1-8b", "choices": [{"text": "\\"model\\":\\"llama-3.1-8b\\""}]}',  # spaced
])
def test_an_event_is_renamed_to_the_catalogue_name_and_nothing_else_changes(payload: bytes) -> None:
    from festina_hpc.daemon.gateway import _renamed

    event = json.loads(payload)
    renamed = json.loads(_renamed(payload, event, "llama8b"))
    assert renamed == {**event, "model": "llama8b"}  # the text that looks like the field is kept as it was
