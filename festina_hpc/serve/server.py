"""The model server's HTTP side: vLLM's OpenAI-compatible API over the simulated engine, plus admin and metrics.

Routes: ``POST /v1/completions`` (streamed as server-sent events ending with
``data: [DONE]``, or one JSON answer), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text) and ``POST /admin/settings`` (``clock_mhz``,
``batch_cap``, ``chunk_tokens``; applied at the engine's next step), which
festina-node's control loop calls after it changed the GPU's clock or chose a
new batch cap or prefill chunk. ``sm_pct`` there is accepted only when it is
the share the server started with: any other answers 409 naming it, since an
MPS client's share is fixed when its CUDA context is created and a new share
takes a new instance (festinad starts one). ``/health`` carries what that
loop plans with: the queue (``running``, ``waiting``,
``pending_prompt_tokens``), ``arrival_rate_per_s``, the settings in force and
the server's ``pid`` (its MPS client). A real deployment runs ``vllm serve``
instead, which speaks the same completions API (see ``serve/launch.py``); its
settings then change through the GPU and vLLM's own restart, not this
endpoint.

With a secret (``secret``: what ``festina serve --secret-file`` reads; festinad
writes one per instance, mode 0600), ``/v1/*``, ``/admin/settings`` and
``/metrics`` answer only a request carrying ``Authorization: Bearer <secret>``
(401 in the API's error shape otherwise): any cluster user can read a job's port
from ``squeue``, so without it they would be served with no key, quota or
accounting, and could change another user's instance. ``/health`` stays open
for readiness but, without the secret, says only ``status`` and ``model``; the
queue, arrival rate, settings and pid (what festinad and festina-node plan
with) go only to a caller with the secret (both hold it). Without a secret the
server is open as before (a user running ``festina serve`` by hand) and logs so
once at start.

``run_server`` serves until ``stop`` is set (SIGTERM in ``festina serve``),
then drains: health turns 503, new requests get 503 with Retry-After, and
in-flight requests get up to ``drain_s`` to finish before the engine stops
and cuts what is left (a stream then ends without ``[DONE]``). Slurm sends
SIGKILL ``KillWait`` seconds (default 30) after SIGTERM, so ``drain_s`` must
stay below it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from festina_hpc.serve import openai
from festina_hpc.serve.engine import EngineStopped, SettingsError, ShareFixedError, SimulatedEngine
from festina_hpc.serve.metrics import CONTENT_TYPE, engine_registry, render

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", SimulatedEngine)
STATE_KEY = web.AppKey("state", dict)
SECRET_KEY = web.AppKey("secret", bytes)  # b"" = no secret: the server is open
RETRY_AFTER_S = 5  # what a draining server tells clients; the gateway will route elsewhere meanwhile


def error_response(exc: openai.ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


def http_error_response(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own error (no route, wrong method, body over ``client_max_size``) in OpenAI's error JSON."""
    if exc.status == 404:
        message = f"no route {request.method} {request.path}"
    elif exc.status == 405:
        message = f"{request.method} is not allowed on {request.path} (allowed: {exc.headers.get('Allow', '')})"
    else:
        message = exc.text or exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    error_type = "invalid_request_error" if exc.status < 500 else "server_error"
    return web.json_response(openai.error_body(message, error_type), status=exc.status, headers=headers)


@web.middleware
async def api_errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Every error a handler or aiohttp raises becomes OpenAI's error JSON, so a client parses one shape.

    ``ApiError`` carries its own status; aiohttp's ``HTTPException`` (unknown route 404, 405, 413
    for a body over ``client_max_size``) keeps its status; JSON too deep for the parser is 400;
    anything else is a logged 500."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except openai.ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect is not an error
            raise
        return http_error_response(request, exc)
    except RecursionError:
        # The one unbounded recursion on client input is a handler's json.loads of a deeply nested
        # body (the admin routes read theirs whole; completions bound the depth first).
        return error_response(openai.ApiError(400, "request body nests JSON too deeply"))
    except Exception:
        if request.writer.output_size > 0:  # a streamed answer has begun: only cutting it is left
            raise
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(openai.error_body("internal error (logged by the server)", "server_error"),
                                 status=500)


def authorized(request: web.Request) -> bool:
    """Whether ``request`` carries the server's secret (always, when it has none)."""
    secret = request.app[SECRET_KEY]
    if not secret:
        return True
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    # compare_digest: the time a comparison takes says nothing about how much of the secret matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret)


OPEN_PATHS = frozenset({"/health"})  # every other route, present or future, needs the secret


@web.middleware
async def require_secret(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Requests to guarded routes without the secret: 401, before any handler reads the body."""
    if request.path not in OPEN_PATHS and not authorized(request):
        raise openai.ApiError(401, "this instance answers only festinad and its node controller "
                              "(Authorization: Bearer <instance secret>)", error_type="authentication_error",
                              code="invalid_instance_secret")
    response: web.StreamResponse = await handler(request)
    return response


def make_app(engine: SimulatedEngine, secret: str | None = None) -> web.Application:
    """The server's routes; with ``secret``, guarded as the module docstring says."""
    # require_secret inside api_errors: its 401 gets the API's JSON error shape.
    app = web.Application(middlewares=[api_errors, require_secret])
    app[ENGINE_KEY] = engine
    app[SECRET_KEY] = (secret or "").encode()
    app[STATE_KEY] = {"draining": False, "created_s": int(time.time()), "registry": engine_registry(engine)}
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/settings", admin_settings)
    app.router.add_get("/admin/settings", admin_settings)
    return app


def _served_name(engine: SimulatedEngine, asked: str) -> bool:
    try:
        return engine.store.model(asked).name == engine.model
    except Exception:  # an unknown name is a 404, not an error of ours
        return False


async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    state = request.app[STATE_KEY]
    if state["draining"]:
        raise openai.ApiError(503, "server is shutting down", error_type="service_unavailable",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
    req = openai.parse_completion(await request.read())
    if not _served_name(engine, req.model):
        raise openai.unknown_model(req.model, [engine.model])
    context_tokens = engine.model_spec.max_context_tokens  # what vLLM refuses too (--max-model-len)
    openai.check_limits(engine.model, req, max_output_tokens=context_tokens, context_tokens=context_tokens)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created_s = int(time.time())
    gen = engine.submit(req.prompt_tokens, req.max_tokens)
    if not req.stream:
        parts: list[str] = []
        try:
            async for text, _ in gen:
                parts.append(text)
        except EngineStopped as exc:
            raise openai.ApiError(503, str(exc), error_type="service_unavailable",
                                  headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        finally:
            gen.cancel()  # no-op when finished; frees the slot when the client went away mid-wait
        return web.json_response(openai.completion(completion_id, created_s, engine.model, "".join(parts),
                                                   gen.finish_reason, req.prompt_tokens, gen.generated))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        async for text, finish_reason in gen:
            await response.write(openai.sse(openai.completion_chunk(completion_id, created_s, engine.model, text,
                                                                   finish_reason)))
        if req.include_usage:
            await response.write(openai.sse(openai.usage_chunk(completion_id, created_s, engine.model,
                                                               req.prompt_tokens, gen.generated)))
        await response.write(openai.SSE_DONE)
    except (ConnectionResetError, EngineStopped):
        # Client gone, or shutdown cut the request: the stream ends without [DONE], which is how a
        # client (and the gateway) tells a cut stream from a finished one.
        gen.cancel()
        return response
    finally:
        gen.cancel()
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return web.json_response(openai.model_list([engine.model], request.app[STATE_KEY]["created_s"]))


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    draining = request.app[STATE_KEY]["draining"]
    body: dict[str, Any] = {"status": "draining" if draining else "ok", "model": engine.model}
    if not authorized(request):
        # Readiness only: anything about the queue or its rate tells another user what this one asks.
        return web.json_response(body, status=503 if draining else 200)
    body.update(gpu=engine.gpu_type, engine="simulated", in_flight=engine.in_flight)
    # Load for festinad, which polls this (one request gives readiness and the queue): sequences
    # admitted and queued, the phase mix as prompt tokens still to prefill.
    stats = engine.stats()
    body.update(running=stats.running, waiting=stats.waiting, pending_prompt_tokens=engine.pending_prompt_tokens,
                arrival_rate_per_s=engine.arrival_rate_per_s, pid=os.getpid())
    # The settings in force: festina-node compares them with its decision and re-sends what differs.
    body.update(vars(engine.settings))
    return web.json_response(body, status=503 if draining else 200)


async def metrics(request: web.Request) -> web.Response:
    body = render(request.app[STATE_KEY]["registry"])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _settings_json(engine: SimulatedEngine) -> dict[str, Any]:
    pending = engine.pending_settings
    return {"settings": vars(engine.settings).copy(), "pending": None if pending is None else vars(pending).copy()}


async def admin_settings(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    if request.method == "GET":
        return web.json_response(_settings_json(engine))
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise openai.ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise openai.ApiError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - {"sm_pct", "clock_mhz", "batch_cap", "chunk_tokens"})
    if unknown:
        raise openai.bad_field(unknown[0], body[unknown[0]],
                               "is not a setting (sm_pct, clock_mhz, batch_cap, chunk_tokens)")
    try:
        engine.update_settings(sm_pct=body.get("sm_pct"), clock_mhz=body.get("clock_mhz"),
                               batch_cap=body.get("batch_cap"), chunk_tokens=body.get("chunk_tokens"))
    except SettingsError as exc:
        field = str(exc).split(" ", 1)[0]
        # 409: a valid share, but not this instance's (it conflicts with the running process).
        raise openai.ApiError(409 if isinstance(exc, ShareFixedError) else 400, str(exc), param=field) from None
    return web.json_response(_settings_json(engine))


@asynccontextmanager
async def running_app(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` on a real socket (port 0: a free one) for the block; yields its base URL."""
    # handler_cancellation: a client that hangs up cancels its handler, so its sequence leaves the batch.
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None,
                           shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()


async def run_server(engine: SimulatedEngine, host: str, port: int, stop: asyncio.Event,
                     on_ready: Callable[[str], None], drain_s: float = 5.0, secret: str | None = None) -> None:
    """Serve until ``stop`` is set, then drain and shut down (see module docstring)."""
    if not secret:
        log.warning("no secret file: this server answers anyone who reaches %s:%d (festinad's jobs get one)",
                    host, port)
    await engine.start()
    app = make_app(engine, secret)
    try:
        async with running_app(app, host, port) as url:
            on_ready(url)
            try:
                await stop.wait()
            finally:
                app[STATE_KEY]["draining"] = True
                await engine.drain(drain_s)
                await engine.stop()  # cut what is left before the runner waits for its handlers
    finally:
        await engine.stop()


@asynccontextmanager
async def simulated_server(engine: SimulatedEngine, host: str = "127.0.0.1", port: int = 0,
                           secret: str | None = None) -> AsyncIterator[str]:
    """Start ``engine`` and serve it for the block (tests, in-process instances); yields the base URL."""
    await engine.start()
    try:
        async with running_app(make_app(engine, secret), host, port) as url:
            yield url
    finally:
        await engine.stop()
