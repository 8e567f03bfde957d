"""festinad's HTTP gateway: the OpenAI-compatible front door that routes each request to a model instance.

``POST /v1/completions`` names a model; the gateway validates the body (400
naming the field and value; JSON nested deeper than ``openai.MAX_JSON_DEPTH``
too), checks the model is known (404 in OpenAI's error shape) and the request
fits it (400 when ``max_tokens`` is above the model's output limit, or prompt
plus ``max_tokens`` above its context), asks the injected ``Router`` for an
instance endpoint, waiting up to ``scale_timeout_s`` while an instance starts
(scale from zero; then 503 with Retry-After), and proxies the request. Upstream it always streams, with
``stream_options.include_usage``, so it can time every request: TTFT to the
first token-bearing chunk, the gaps between tokens (mean and max), and the
instance's own token counts. A streaming client gets the chunks as they come
(the usage chunk only if it asked for it); a non-streaming client gets them
assembled into one completion (text, finish reason and usage; per-token
logprobs are not assembled). An instance that cannot be reached before any
byte of its answer (refused, reset, closed before its headers) is reported to
the router (``Router.failed``) and the request routed again, at most
``MAX_REROUTES`` times and within what is left of ``scale_timeout_s`` (then 503
with Retry-After): behind festinad it waits for a dead instance's replacement
as for a cold start. An instance that answers 5xx, or sends a malformed stream,
gives 502; one that fails or stops once a stream has begun gives the client an
error event and no ``[DONE]``; its 400/413/422/429/503 answers pass through. A client that
hangs up (streaming or not) closes the upstream stream, which ends the
generation on the instance at its next step. Each request ends as one
``CompletionRecord`` handed to the injected ``Recorder``, with its SLO
outcome against the model's ``Slo``.

When the app shuts down (festinad's SIGTERM: ``runner.cleanup()``), the
requests in flight get ``shutdown_s`` to finish; those still running are then
cut: recorded as ``GATEWAY_STOPPED`` with the tokens served so far, a stream
that has begun ends with an error event and no ``[DONE]``, any other answer is
503 with Retry-After. All of it happens before the runner closes the
connections, so the records are the recorder's before ``cleanup()`` returns.

With an ``Authenticator`` (``festina_hpc.daemon.auth``) every request is first
tied to a tenant by its API key (401 without a valid one where keys are
required), then admitted for its model (403), its account's energy quota and
its key's rate (429); a refused request reaches no instance and leaves no
record. The tenant's user, account and key go into the request's record. A
request whose account is over its quota under ``over_quota = "deprioritize"``
waits for the router until no normal-priority request is waiting there, so in
a busy period the others go first; its wait counts against ``scale_timeout_s``.

Every 4xx and 5xx answer, aiohttp's own included (no route 404, 405, a body
over 1 MiB 413), carries OpenAI's error JSON (``serve.server.api_errors``).

``GET /v1/models`` lists the models the daemon knows (whether or not an
instance runs: a request for one starts it), with keys only those the key
allows, under their public names (the catalogue's, where it names them);
every answer, each streamed chunk included, names the model by that name,
whichever alias the request used (the instance itself answers under the
profile's name, which the gateway also accepts and routes by). ``GET /health`` answers 200 without a key.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from festina_hpc.cluster.slo import DEFAULT_TBT_MULTIPLIER, DEFAULT_TTFT_MULTIPLIER, default_slo
from festina_hpc.daemon.auth import Authenticator, Priority, Tenant
from festina_hpc.daemon.records import CompletionRecord, Outcome, Recorder
from festina_hpc.daemon.routing import Endpoint, NoInstance, Router
from festina_hpc.policy.types import Slo
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve import openai
from festina_hpc.serve.server import api_errors

log = logging.getLogger(__name__)

PASSED_THROUGH = frozenset({400, 413, 422, 429, 503})  # upstream answers that are the client's to see
# Failures before the instance's response headers that mean it is not there (refused or reset on connect,
# closed before answering), so the request is routed again. A connect or read timeout is not among them:
# a slow instance may still be working on it.
UNREACHABLE = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)  # ClientOSError: refused (connector), reset
MAX_REROUTES = 3  # reroutes of one request after unreachable instances: bounded, never a loop


@dataclass(frozen=True)
class GatewayModel:
    """A model the gateway serves: its canonical name, the names clients may use, its SLO.

    ``name`` is the profile's canonical name, what instances run and records, keys and quotas
    name; ``public_name`` (the catalogue's name, None: ``name``) is the one clients see, in
    ``/v1/models`` and in every answer's ``model``; ``aliases`` are the other names accepted."""

    name: str
    slo: Slo
    aliases: tuple[str, ...] = ()
    max_prompt_tokens: int | None = None  # longer prompts get 400 before any instance starts
    max_output_tokens: int | None = None  # a larger max_tokens gets 400 (None: no bound of its own)
    context_tokens: int | None = None  # prompt plus max_tokens above it gets 400 (None: not checked)
    public_name: str | None = None

    @property
    def public(self) -> str:
        return self.public_name or self.name


def gateway_models(store: ProfileStore, gpu_type: str, names: Iterable[str],
                   ttft_multiplier: float = DEFAULT_TTFT_MULTIPLIER, tbt_multiplier: float = DEFAULT_TBT_MULTIPLIER,
                   max_prompt_tokens: int = 0) -> list[GatewayModel]:
    """Models with the default SLOs (``cluster.slo.default_slo``) on ``gpu_type``.

    A prompt may hold at most ``max_prompt_tokens`` (0: the model's context length); an answer at
    most the context length, and the two together no more than it."""
    models = []
    for name in names:
        spec = store.model(name)
        slo = default_slo(store, gpu_type, spec.name, ttft_multiplier, tbt_multiplier)
        limit = min(max_prompt_tokens or spec.max_context_tokens, spec.max_context_tokens)
        models.append(GatewayModel(spec.name, slo, (spec.hf_name, *spec.aliases), limit,
                                   spec.max_context_tokens, spec.max_context_tokens))
    return models


@dataclass(frozen=True)
class GatewayConfig:
    scale_timeout_s: float = 60.0  # longest a request waits for the router (an instance starting)
    retry_after_s: int = 10  # Retry-After on a 503
    connect_timeout_s: float = 5.0  # to an instance
    read_timeout_s: float = 120.0  # longest silence between an instance's chunks
    shutdown_s: float = 10.0  # when the app stops, in-flight requests' time to finish before they are cut


CUT_NOTICE_S = 2.0  # when the app stops, a cut request's time to record itself and tell its client


class _Unreachable(Exception):
    """The instance could not be reached before any byte of its answer: nothing was sent, the request may go
    elsewhere."""

    def __init__(self, url: str, why: str):
        super().__init__(f"{url}: {why}")
        self.url = url
        self.why = why


class _ClientGone(Exception):
    """The client hung up while the gateway was writing to it."""


@dataclass
class _Timing:
    """Token timestamps of one streamed answer (gateway clock, seconds)."""

    start_s: float
    first_s: float | None = None
    last_s: float | None = None
    chunks: int = 0
    max_gap_s: float = 0.0
    done: bool = False  # [DONE] seen
    usage: dict[str, int] | None = None
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    first_event: dict[str, Any] | None = None

    def token(self, now_s: float) -> None:
        if self.last_s is not None:
            self.max_gap_s = max(self.max_gap_s, now_s - self.last_s)
        else:
            self.first_s = now_s
        self.last_s = now_s
        self.chunks += 1


@dataclass
class _Flight:
    """A completion in progress: what its record needs, filled in as the request goes (``in_flight`` reads it)."""

    model: GatewayModel
    req: openai.CompletionRequest
    arrival_unix_s: float
    start_s: float
    tenant: Tenant | None
    endpoint: Endpoint | None = None  # the instance answering it (None: not routed yet, or not reached)
    route_s: float = 0.0  # of which waiting for the router
    timing: _Timing | None = None  # once the instance answered 200
    request_id: str | None = None  # given at its first checkpoint; its final record carries it


class _PriorityGate:
    """Low-priority requests go to the router only while no normal-priority request waits there."""

    def __init__(self) -> None:
        self.waiting = 0  # normal-priority requests waiting for the router
        self._clear = asyncio.Event()
        self._clear.set()

    @contextmanager
    def normal(self) -> Iterator[None]:
        self.waiting += 1
        self._clear.clear()
        try:
            yield
        finally:
            self.waiting -= 1
            if not self.waiting:
                self._clear.set()

    async def low(self) -> None:
        while self.waiting:
            await self._clear.wait()


class Gateway:
    """Build with a router, a recorder and the known models; ``app()`` is the aiohttp application.

    ``auth``: None serves everyone unattributed (the benchmark's baseline, tests)."""

    def __init__(self, router: Router, recorder: Recorder, models: Sequence[GatewayModel],
                 config: GatewayConfig = GatewayConfig(), clock: Callable[[], float] = time.perf_counter,
                 wall_clock: Callable[[], float] = time.time, auth: Authenticator | None = None):
        self.router = router
        self.recorder = recorder
        self.config = config
        self.auth = auth
        self._gate = _PriorityGate()
        self.models = {m.name: m for m in models}
        self._names = {alias.lower(): m for m in models for alias in (m.name, m.public, *m.aliases)}
        self._clock = clock
        self._wall = wall_clock
        self._session: aiohttp.ClientSession | None = None
        self._created_s = int(wall_clock())
        self._flights: dict[asyncio.Task[Any], _Flight] = {}  # the handler tasks of completions in progress
        self._run_id = uuid.uuid4().hex[:12]  # request ids are this gateway run's, then a counter
        self._checkpointed = 0
        self._stopping = False  # the app is shutting down: a cancelled completion was cut by it

    def app(self) -> web.Application:
        app = web.Application(middlewares=[api_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.cleanup_ctx.append(self._client_session)
        app.on_shutdown.append(self._cut_flights)
        return app

    async def _cut_flights(self, app: web.Application) -> None:
        """Give the completions in flight ``shutdown_s`` to finish, then cut the rest (module docstring).

        on_shutdown runs after the listeners closed and before the runner closes the connections, so a
        cut stream can still send its error event. Cancelling the handler is the cut: it raises at
        whatever the handler awaits (the router, the instance, a slow client)."""
        self._stopping = True
        if self._flights:
            await asyncio.wait(set(self._flights), timeout=self.config.shutdown_s)
        cut = set(self._flights)
        if not cut:
            return
        log.warning("festinad is stopping: cutting %d request(s) still in flight after %g s", len(cut),
                    self.config.shutdown_s)
        for task in cut:
            task.cancel()
        await asyncio.wait(cut, timeout=CUT_NOTICE_S)

    async def _client_session(self, app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s,
                                        sock_read=self.config.read_timeout_s)
        # No connection cap: the policy decides how much an instance takes, not the pool.
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        self._stopping = False  # a gateway whose last app stopped may serve another
        yield
        await self._session.close()

    # -- small routes --------------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        tenant = await self._tenant(request)
        return web.json_response(openai.model_list(self._known(tenant), self._created_s))

    def _known(self, tenant: Tenant | None) -> list[str]:
        """The public names of the models ``tenant`` may call (keys name canonical names)."""
        return sorted(m.public for m in self.models.values() if tenant is None or tenant.allows(m.name))

    async def _tenant(self, request: web.Request) -> Tenant | None:
        if self.auth is None:
            return None
        return await self.auth.authenticate(request.headers.get("Authorization"))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "models": len(self.models)})

    # -- completions ---------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        start_s = self._clock()
        arrival_unix_s = self._wall()
        tenant = await self._tenant(request)  # before the body is read: no key, no work
        req = openai.parse_completion(await request.read())
        model = self._names.get(req.model.lower())
        if model is None:
            raise openai.unknown_model(req.model, self._known(tenant))
        # Refused here, before a cold start is paid for a request no instance would take.
        openai.check_limits(model.public, req, max_prompt_tokens=model.max_prompt_tokens,
                            max_output_tokens=model.max_output_tokens, context_tokens=model.context_tokens)
        priority = Priority.NORMAL
        if self.auth is not None and tenant is not None:
            priority = await self.auth.admit(tenant, model.name)

        flight = _Flight(model, req, arrival_unix_s, start_s, tenant)
        task = asyncio.current_task()
        assert task is not None
        self._flights[task] = flight
        try:
            return await self._serve(request, flight, priority)
        finally:
            del self._flights[task]

    def in_flight(self) -> list[CompletionRecord]:
        """Checkpoints of the completions an instance is answering now: outcome ``IN_FLIGHT``, the tokens served
        so far. Each gets a request id at its first checkpoint, which its final record carries, so the store
        replaces the one by the other; festinad writes them every flush, so a crash (SIGKILL) loses at most
        a flush period of any request's tokens. Call it on the gateway's event loop."""
        records = []
        for flight in self._flights.values():
            if flight.timing is None:
                continue  # not at an instance yet: it has cost nothing to charge
            if flight.request_id is None:
                self._checkpointed += 1
                flight.request_id = f"{self._run_id}-{self._checkpointed}"
            records.append(self._build_record(flight, Outcome.IN_FLIGHT, 200))
        return records

    async def _serve(self, request: web.Request, flight: _Flight, priority: Priority) -> web.StreamResponse:
        model, req = flight.model, flight.req
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + self.config.scale_timeout_s
        unreachable: _Unreachable | None = None
        for attempt in range(MAX_REROUTES + 1):
            try:
                # A reroute waits only for what is left of the request's scale_timeout_s.
                endpoint = await asyncio.wait_for(self._route(model, req, priority), deadline_s - loop.time())
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
                flight.route_s = self._clock() - flight.start_s
                self._record(flight, Outcome.GATEWAY_STOPPED, 503)
                raise self._stopped_error(model) from None
            except (TimeoutError, NoInstance) as exc:
                why = str(exc) if isinstance(exc, NoInstance) else \
                    f"no instance of {model.public} became ready within {self.config.scale_timeout_s:g} s"
                if unreachable is not None:
                    why += f" (instance {unreachable.url} could not be reached: {unreachable.why})"
                raise self._unavailable(flight, why) from None
            flight.endpoint, flight.route_s = endpoint, self._clock() - flight.start_s
            try:
                return await self._proxy(request, flight, endpoint)
            except _Unreachable as exc:
                # Nothing was sent to the client and the instance saw no request: route it again (the router
                # stops routing there and, behind festinad, waits for a replacement as for a cold start).
                log.warning("instance %s of %s could not be reached (%s): %s", exc.url, model.name, exc.why,
                            f"request routed again ({attempt + 1} of {MAX_REROUTES})" if attempt < MAX_REROUTES
                            else "no reroute left")
                unreachable = exc
                flight.endpoint = None  # it saw nothing of this request
                self.router.failed(endpoint)
            finally:
                self.router.done(endpoint)
        assert unreachable is not None
        raise self._unavailable(flight, f"no instance of {model.public} answered: instance {unreachable.url} "
                                                  f"could not be reached: {unreachable.why}")

    def _unavailable(self, flight: _Flight, why: str) -> openai.ApiError:
        """The request's 503 (with Retry-After), recorded: no instance served it in time."""
        flight.route_s = self._clock() - flight.start_s
        self._record(flight, Outcome.NO_INSTANCE, 503)
        return openai.ApiError(503, why, error_type="service_unavailable",
                               headers={"Retry-After": str(self.config.retry_after_s)})

    async def _route(self, model: GatewayModel, req: openai.CompletionRequest, priority: Priority) -> Endpoint:
        if priority is Priority.LOW:
            await self._gate.low()
            return await self.router.route(model.name, req.prompt_tokens)
        with self._gate.normal():
            return await self.router.route(model.name, req.prompt_tokens)

    async def _proxy(self, request: web.Request, flight: _Flight, endpoint: Endpoint) -> web.StreamResponse:
        assert self._session is not None, "the gateway app is not running"
        model, req = flight.model, flight.req
        body = dict(req.body)
        body.update(model=model.name, stream=True, stream_options={"include_usage": True})
        timing = _Timing(self._clock())
        response: web.StreamResponse | None = None
        reached = False  # the instance's response headers arrived
        try:
            async with self._session.post(f"{endpoint.url}/v1/completions", json=body,
                                          headers=endpoint.auth_headers()) as upstream:
                reached = True
                if upstream.status != 200:
                    data = await upstream.read()
                    if upstream.status in PASSED_THROUGH:
                        self._record(flight, Outcome.UPSTREAM_ERROR, upstream.status)
                        headers = {k: v for k, v in upstream.headers.items() if k in ("Retry-After", "Content-Type")}
                        return web.Response(status=upstream.status, body=data, headers=headers)
                    raise _UpstreamStatus(upstream.status, data)
                flight.timing = timing  # from here on the record carries what the instance served
                public = model.public
                async for payload, event in _events(upstream.content):
                    if payload is None:
                        timing.done = True
                        if response is not None:
                            await _send(response, openai.SSE_DONE)
                        break
                    choices = event.get("choices") or []
                    if choices and choices[0].get("text"):
                        timing.token(self._clock())
                    if event.get("usage"):
                        timing.usage = event["usage"]
                    if not req.stream:
                        if _gone(request):
                            raise _ClientGone()  # leaving the block closes the upstream: the instance stops it
                        _collect(timing, event, choices)
                        continue
                    if not choices and not req.include_usage:
                        continue  # the usage chunk the gateway asked for, not the client
                    if response is None:
                        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
                        await response.prepare(request)
                    served = event.get("model")
                    if served is not None and served != public:
                        # The instance answers under the profile's name (vLLM's --served-model-name); the
                        # client called the catalogue's.
                        payload = _renamed(payload, event, public)
                    await _send(response, b"data: " + payload + b"\n\n")
        except _ClientGone:
            # The tokens served so far are recorded (and charged); closing the upstream stream ends the
            # generation on the instance at its next step.
            self._record(flight, Outcome.CLIENT_GONE, 200 if response is not None else 499)
            return response if response is not None else web.Response(status=499)
        except asyncio.CancelledError:
            if not self._stopping:  # a runner that cancels the handlers of clients that hang up
                self._record(flight, Outcome.CLIENT_GONE, 200 if response is not None else 499)
                raise
            # festinad is stopping (_cut_flights): leaving the block closed the upstream stream, so the
            # instance stops generating; what it served is recorded, and charged, here.
            _uncancel()
            self._record(flight, Outcome.GATEWAY_STOPPED, 200 if response is not None else 503)
            if response is None:
                raise self._stopped_error(model) from None
            try:
                await _send(response, openai.sse(openai.error_body(
                    f"festinad stopped before the answer from {model.public} was complete; retry",
                    "service_unavailable")))
                await response.write_eof()
            except (_ClientGone, ConnectionError):
                pass
            return response
        except (aiohttp.ClientError, TimeoutError, ValueError, _UpstreamStatus) as exc:
            if not reached and isinstance(exc, UNREACHABLE):
                raise _Unreachable(endpoint.url, _describe(exc)) from None
            log.warning("upstream %s failed for %s: %s", endpoint.url, model.name, exc)
            if response is None:
                self._record(flight, Outcome.UPSTREAM_ERROR, 502)
                raise openai.ApiError(502, f"instance {endpoint.url} of {model.public} failed: {_describe(exc)}",
                                      error_type="upstream_error") from None
        if not timing.done:
            # The instance closed the stream without [DONE] (it stopped): a cut stream, not a finished one.
            if response is None:
                self._record(flight, Outcome.UPSTREAM_ERROR, 502)
                raise openai.ApiError(502, f"instance {endpoint.url} of {model.public} ended the stream early",
                                      error_type="upstream_error")
            # Its headers (200) are sent: the client learns of the failure from an error event, with no
            # [DONE] after it, as OpenAI's API ends a stream that fails.
            self._record(flight, Outcome.UPSTREAM_ERROR, 200)
            try:
                await _send(response, openai.sse(openai.error_body(
                    f"instance {endpoint.url} of {model.public} ended the stream early", "upstream_error")))
                await response.write_eof()
            except _ClientGone:
                pass
            return response
        if response is not None:
            self._record(flight, Outcome.OK, 200)
            await response.write_eof()
            return response
        first = timing.first_event or {}
        prompt_tokens, output_tokens = _tokens(timing, req)
        answer = openai.completion(first.get("id", f"cmpl-{uuid.uuid4().hex}"), first.get("created", int(self._wall())),
                                   model.public, "".join(timing.parts), timing.finish_reason,
                                   prompt_tokens, output_tokens)
        self._record(flight, Outcome.OK, 200)
        return web.json_response(answer)

    def _stopped_error(self, model: GatewayModel) -> openai.ApiError:
        _uncancel()
        return openai.ApiError(503, f"festinad stopped before the answer from {model.public} was complete; retry",
                               error_type="service_unavailable",
                               headers={"Retry-After": str(self.config.retry_after_s)})

    def _record(self, flight: _Flight, outcome: Outcome, status: int) -> None:
        try:
            self.recorder.record(self._build_record(flight, outcome, status))
        except Exception:  # a failing recorder must not fail the request it records
            log.exception("recorder failed on a %s record", flight.model.name)

    def _build_record(self, flight: _Flight, outcome: Outcome, status: int) -> CompletionRecord:
        model, req, timing, endpoint, tenant = flight.model, flight.req, flight.timing, flight.endpoint, flight.tenant
        end_s = self._clock()
        prompt_tokens, output_tokens = _tokens(timing, req) if timing else (req.prompt_tokens, 0)
        ttft_s = tbt_mean_s = tbt_max_s = None
        if timing is not None and timing.first_s is not None and timing.last_s is not None:
            ttft_s = timing.first_s - flight.start_s
            if timing.chunks > 1:
                tbt_max_s = timing.max_gap_s
                tbt_mean_s = (timing.last_s - timing.first_s) / (max(output_tokens, timing.chunks) - 1)
        ttft_slo_s = model.slo.ttft_for(prompt_tokens)
        met = (outcome is Outcome.OK and ttft_s is not None and ttft_s <= ttft_slo_s
               and (tbt_mean_s is None or tbt_mean_s <= model.slo.tbt_s))
        return CompletionRecord(
            model=model.name, arrival_unix_s=flight.arrival_unix_s, outcome=outcome, status=status,
            stream=req.stream, endpoint=endpoint.url if endpoint else None,
            instance_id=endpoint.instance_id if endpoint else None, prompt_tokens=prompt_tokens,
            output_tokens=output_tokens, ttft_s=ttft_s, tbt_mean_s=tbt_mean_s, tbt_max_s=tbt_max_s,
            e2e_s=end_s - flight.start_s, route_s=flight.route_s, ttft_slo_s=ttft_slo_s, tbt_slo_s=model.slo.tbt_s,
            slo_met=met, user_name=tenant.user_name if tenant else "", account=tenant.account if tenant else "",
            api_key_id=tenant.key_id if tenant else None, request_id=flight.request_id)


class _UpstreamStatus(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


def _uncancel() -> None:
    """The cancellation was the gateway's own cut (``_cut_flights``): the handler answers instead of ending
    cancelled."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


async def _events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[bytes | None, dict[str, Any]]]:
    """The SSE ``data:`` events of an upstream stream: (raw JSON, parsed), or (None, {}) for ``[DONE]``."""
    async for line in content:
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, other SSE fields
        payload = line[5:].strip()
        if payload == b"[DONE]":
            yield None, {}
            return
        event = json.loads(payload)
        if not isinstance(event, dict):
            raise ValueError(f"upstream event is not a JSON object: {payload[:80]!r}")
        yield payload, event


@functools.lru_cache(maxsize=256)
def _model_field(name: str) -> bytes:
    return b'"model":' + json.dumps(name).encode()


def _renamed(payload: bytes, event: dict[str, Any], public: str) -> bytes:
    """The event with ``model`` set to ``public``: its one ``"model":`` field replaced in the bytes where the
    instance wrote it compactly (vLLM does; a streamed token pays no JSON encoding), else written anew."""
    served = _model_field(str(event["model"]))
    if payload.count(served) == 1:
        return payload.replace(served, _model_field(public))
    return json.dumps({**event, "model": public}, separators=(",", ":")).encode()


def _gone(request: web.Request) -> bool:
    """Whether the client hung up (a non-streamed request writes nothing until the end to find out)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def _send(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionResetError:
        raise _ClientGone() from None


def _collect(timing: _Timing, event: dict[str, Any], choices: list[dict[str, Any]]) -> None:
    """Assemble a non-streamed answer from the upstream's chunks."""
    if timing.first_event is None and choices:
        timing.first_event = event
    for choice in choices:
        timing.parts.append(choice.get("text") or "")
        if choice.get("finish_reason"):
            timing.finish_reason = choice["finish_reason"]


def _tokens(timing: _Timing, req: openai.CompletionRequest) -> tuple[int, int]:
    """(prompt, output) tokens: the instance's usage when it sent one, else the gateway's counts."""
    if timing.usage:
        return int(timing.usage.get("prompt_tokens", req.prompt_tokens)), int(timing.usage.get("completion_tokens",
                                                                                               timing.chunks))
    return req.prompt_tokens, timing.chunks

