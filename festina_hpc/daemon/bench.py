"""``festina bench gateway``: what the gateway costs, in throughput and added latency over direct requests.

A fast upstream (an OpenAI-compatible stub that answers at once, no pacing)
runs in one process, the gateway (``StaticRouter`` to it, in-memory
recorder) in a second, and the load generator in this one, so each event loop
has a core and the gateway's figures are its own. Added latency compares
the same requests sent one at a time through the gateway and straight to the
upstream, interleaved so drift hits both alike: p50 and p99 of the gateway's
request times minus the same percentiles of the direct ones. Throughput is
requests/s with ``concurrency`` requests in flight, both paths. Each mode
(streamed, not streamed) is measured; a request returns ``tokens`` tokens.

Authentication is measured side by side in the same run: a second gateway
process requires an API key (``festina_hpc.daemon.auth``, keys in memory, so
the figure is the gateway's own cost: header check, SHA-256, the key cache
and a token bucket, as festinad runs them between its database lookups).
Every request carries the key, to both gateways. The upstream answers only
with its instance secret (``serve/server.py``'s check, as a serving job
does), which both gateways send and the direct requests carry. Their throughputs are
measured in alternating rounds and the median of each is reported, so a
burst of load from elsewhere on the machine does not land on one side only;
``auth_throughput_ratio`` is authenticated / open requests/s. On a machine
others share, that ratio still wanders by several percent either way, so two
steadier figures come with it: ``auth_cpu_ratio``, the open gateway's CPU
time per request over the authenticating one's in the same rounds (what a
CPU-bound gateway's throughput ratio is), and ``auth_cost_us_per_request``,
the time one request's key check and admission take, measured in this
process.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import secrets
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
from aiohttp import web

from festina_hpc.daemon.auth import AuthConfig, Authenticator, MemoryKeys
from festina_hpc.daemon.gateway import Gateway, GatewayModel
from festina_hpc.daemon.records import MemoryRecorder
from festina_hpc.daemon.routing import StaticRouter
from festina_hpc.db.keys import new_token
from festina_hpc.policy.types import Slo
from festina_hpc.serve import openai
from festina_hpc.serve.engine import filler_token
from festina_hpc.serve.server import SECRET_KEY, authorized, running_app

BENCH_MODEL = "llama-3.1-8b"
BENCH_RATE_PER_S = 1e9  # the key's rate limit: checked on every request, never reached
ROUNDS = 5  # alternating throughput rounds per gateway


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


def stub_upstream(tokens: int, secret: str | None = None) -> web.Application:
    """An instance that answers every completion at once with ``tokens`` filler tokens; with ``secret``, only
    to requests that carry it (the model server's own check)."""
    texts = [filler_token(i) for i in range(tokens)]

    async def completions(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            raise web.HTTPUnauthorized()
        req = openai.parse_completion(await request.read())
        if not req.stream:
            return web.json_response(openai.completion("cmpl-bench", 0, BENCH_MODEL, "".join(texts), "length",
                                                       req.prompt_tokens, tokens))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = [openai.sse(openai.completion_chunk("cmpl-bench", 0, BENCH_MODEL, text,
                                                     "length" if i == tokens - 1 else None))
                  for i, text in enumerate(texts)]
        if req.include_usage:
            events.append(openai.sse(openai.usage_chunk("cmpl-bench", 0, BENCH_MODEL, req.prompt_tokens, tokens)))
        await response.write(b"".join(events) + openai.SSE_DONE)
        await response.write_eof()
        return response

    # The server's own check (``authorized``) in the handler, not its middlewares: this stub stands for an
    # instance on another node, and on the bench's machine its CPU is taken from the gateway's.
    app = web.Application()
    app[SECRET_KEY] = (secret or "").encode()
    app.router.add_post("/v1/completions", completions)
    return app


def bench_gateway_app(upstream_url: str, token: str | None = None, secret: str | None = None) -> web.Application:
    """The gateway as the benchmark runs it; with ``token``, requiring that API key; ``secret``: the upstream's."""
    model = GatewayModel(BENCH_MODEL, Slo(ttft_s=1.0, tbt_s=1.0))
    auth = None
    if token is not None:
        keys = MemoryKeys()
        keys.add("bench", "bench", rate_limit_per_s=BENCH_RATE_PER_S, token=token)
        auth = Authenticator(keys, AuthConfig(require_keys=True))
    return Gateway(StaticRouter({BENCH_MODEL: [upstream_url]}, secret), MemoryRecorder(), [model], auth=auth).app()


def _serve_child(kind: str, arg: Any, conn: Connection) -> None:
    """Child process: serve the stub upstream or the gateway until the parent closes the pipe."""
    async def main() -> None:
        app = stub_upstream(*arg) if kind == "upstream" else bench_gateway_app(*arg)
        async with running_app(app) as url:
            conn.send(url)
            await asyncio.get_running_loop().run_in_executor(None, _wait_closed, conn)

    asyncio.run(main())


def _wait_closed(conn: Connection) -> None:
    """Answer the parent's "cpu" asks with this process's CPU seconds until it closes the pipe."""
    try:
        while conn.recv() == "cpu":
            conn.send(time.process_time())
    except EOFError:
        pass


class _Child:
    def __init__(self, kind: str, arg: Any):
        ctx = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_serve_child, args=(kind, arg, child_conn), daemon=True)
        self.process.start()
        child_conn.close()
        if not self._conn.poll(30):
            self.close()
            raise RuntimeError(f"bench {kind} did not start")
        self.url: str = self._conn.recv()

    def cpu_s(self) -> float:
        """The child's CPU time so far (user + system, all its threads)."""
        self._conn.send("cpu")
        return float(self._conn.recv())

    def close(self) -> None:
        self._conn.close()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], stream: bool,
               headers: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {await resp.text()}")
        data = await resp.read()
    if stream and not data.endswith(openai.SSE_DONE):
        raise RuntimeError(f"{url}: stream ended without [DONE]")
    return time.perf_counter() - start


async def _throughput(session: aiohttp.ClientSession, url: str, body: dict[str, Any], stream: bool,
                      requests: int, concurrency: int, headers: dict[str, str] | None = None) -> float:
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await _one(session, url, body, stream, headers)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - start)


async def _measure(upstream: str, gateway: _Child, gateway_auth: _Child, token: str, requests: int,
                   concurrency: int, tokens: int, stream: bool, secret: str) -> dict[str, Any]:
    body = {"model": BENCH_MODEL, "prompt": "a short benchmark prompt", "max_tokens": tokens, "stream": stream}
    direct_url = f"{upstream}/v1/completions"
    direct_headers = {"Authorization": f"Bearer {secret}"}  # the upstream's secret, in place of the key
    urls = {gateway: f"{gateway.url}/v1/completions", gateway_auth: f"{gateway_auth.url}/v1/completions"}
    connector = aiohttp.TCPConnector(limit=0)
    # Every request carries the key, so the two gateways differ only in checking it.
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {token}"}) as session:
        for _ in range(min(200, requests)):  # warm up connections and code paths on every side
            for url in urls.values():
                await _one(session, url, body, stream)
            await _one(session, direct_url, body, stream, direct_headers)
        direct: list[float] = []
        latency: dict[_Child, list[float]] = {gateway: [], gateway_auth: []}
        for i in range(requests):
            direct.append(await _one(session, direct_url, body, stream, direct_headers))
            # Alternating which gateway goes first: the second of a pair runs a little slower.
            for child in (gateway, gateway_auth) if i % 2 == 0 else (gateway_auth, gateway):
                latency[child].append(await _one(session, urls[child], body, stream))
        rps_direct = await _throughput(session, direct_url, body, stream, requests, concurrency, direct_headers)
        rounds: dict[_Child, list[float]] = {gateway: [], gateway_auth: []}
        cpu_us: dict[_Child, list[float]] = {gateway: [], gateway_auth: []}
        for i in range(2 * ROUNDS):
            child = (gateway, gateway_auth)[i % 2]
            cpu_before_s = child.cpu_s()
            rounds[child].append(await _throughput(session, urls[child], body, stream, requests, concurrency))
            cpu_us[child].append((child.cpu_s() - cpu_before_s) / requests * 1e6)
    rps_gateway, rps_auth = statistics.median(rounds[gateway]), statistics.median(rounds[gateway_auth])
    cpu_gateway_us, cpu_auth_us = statistics.median(cpu_us[gateway]), statistics.median(cpu_us[gateway_auth])
    through, through_auth = latency[gateway], latency[gateway_auth]

    def us(seconds: float) -> float:
        return seconds * 1e6

    return {
        "mode": "stream" if stream else "no-stream",
        "requests": requests,
        "concurrency": concurrency,
        "requests_per_s_gateway": rps_gateway,
        "requests_per_s_gateway_auth": rps_auth,
        "requests_per_s_direct": rps_direct,
        "auth_throughput_ratio": rps_auth / rps_gateway,
        "cpu_us_per_request_gateway": cpu_gateway_us,
        "cpu_us_per_request_gateway_auth": cpu_auth_us,
        # A gateway that is CPU-bound serves in inverse proportion to its CPU per request.
        "auth_cpu_ratio": cpu_gateway_us / cpu_auth_us,
        "latency_p50_us_gateway": us(percentile(through, 50)),
        "latency_p50_us_gateway_auth": us(percentile(through_auth, 50)),
        "latency_p50_us_direct": us(percentile(direct, 50)),
        "added_latency_p50_us": us(percentile(through, 50) - percentile(direct, 50)),
        "added_latency_p99_us": us(percentile(through, 99) - percentile(direct, 99)),
        "added_latency_p50_us_auth": us(percentile(through_auth, 50) - percentile(direct, 50)),
        "added_latency_p99_us_auth": us(percentile(through_auth, 99) - percentile(direct, 99)),
    }


def auth_cost_us(requests: int = 20_000) -> float:
    """Microseconds per request of ``authenticate`` and ``admit`` with a cached key and a rate limit."""
    keys = MemoryKeys()
    token = keys.add("bench", "bench", rate_limit_per_s=BENCH_RATE_PER_S)
    auth = Authenticator(keys, AuthConfig(require_keys=True))
    header = f"Bearer {token}"

    async def loop() -> float:
        await auth.admit(await auth.authenticate(header), BENCH_MODEL)  # the key is cached from here on
        start = time.perf_counter()
        for _ in range(requests):
            await auth.admit(await auth.authenticate(header), BENCH_MODEL)
        return (time.perf_counter() - start) / requests * 1e6

    return asyncio.run(loop())


def run_gateway_bench(requests: int = 2000, concurrency: int = 32, tokens: int = 8,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The benchmark's figures as one JSON-able object (see the module docstring)."""
    token = new_token()
    secret = secrets.token_urlsafe(32)
    upstream = _Child("upstream", (tokens, secret))
    try:
        gateway = _Child("gateway", (upstream.url, None, secret))
        gateway_auth = _Child("gateway", (upstream.url, token, secret))
        try:
            rows = []
            for stream in (True, False):
                if progress:
                    progress(f"measuring {'streamed' if stream else 'non-streamed'} requests")
                rows.append(asyncio.run(_measure(upstream.url, gateway, gateway_auth, token, requests,
                                                 concurrency, tokens, stream, secret)))
        finally:
            gateway_auth.close()
            gateway.close()
    finally:
        upstream.close()
    # The headline keys the issue asks for: the streamed mode's figures (the gateway's usual path).
    head = rows[0]
    return {"benchmark": "gateway", "req_per_s": head["requests_per_s_gateway"],
            "overhead_p50_ms": head["added_latency_p50_us"] / 1000.0,
            "overhead_p99_ms": head["added_latency_p99_us"] / 1000.0,
            "req_per_s_auth": head["requests_per_s_gateway_auth"],
            "auth_throughput_ratio": head["auth_throughput_ratio"],
            "auth_cpu_ratio": head["auth_cpu_ratio"],
            "overhead_p50_ms_auth": head["added_latency_p50_us_auth"] / 1000.0,
            "overhead_p99_ms_auth": head["added_latency_p99_us_auth"] / 1000.0,
            "auth_cost_us_per_request": auth_cost_us(),
            "tokens_per_request": tokens, "auth": "both: an open gateway and one requiring the key, side by side",
            "throughput_rounds": ROUNDS, "modes": rows,
            "setup": "stub upstream, two gateways and the load generator in four processes on one machine"}
