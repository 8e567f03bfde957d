"""festinad as a running service: the gateway, the ``Festinad`` core and their APScheduler jobs on one event loop.

``run_festinad`` is what ``festina daemon`` (and the ``festinad`` script)
calls once ``main()`` has built every backend: it sets the core up (view
from the database and Slurm), serves the gateway, and schedules the periodic
jobs, each coalesced with ``max_instances=1`` so a slow Slurm never stacks
runs: reconcile, the policy's ``scale`` and ``consolidate`` at their periods
(the policy's own unless the config sets one), and the flush of request
records to the database, with a checkpoint of each request still in flight
(``requests_in_flight``): when festinad dies without a stop (SIGKILL, a crash), the
next one records those as ``gateway_crashed`` with their last checkpoint's tokens, so
a crash loses at most ``flush_s`` of any request's tokens. ``GET /metrics`` answers Prometheus (see
``festina_hpc.daemon.metrics``) on a listener of its own (``[daemon] metrics_listen``, loopback by
default), never on the gateway: the gateway may face every user, the scrape is the operator's.
``/admin/*`` is on the gateway behind ``AdminApi``'s check (admin key, or loopback). On stop
(SIGTERM) the gateway stops taking connections and gives in-flight requests ``shutdown_s`` to
finish, then cuts the rest (recorded as ``gateway_stopped`` with the tokens served; see
``festina_hpc.daemon.gateway``); the records are flushed to the database before festinad exits.
Serving jobs keep running, so a restarted festinad takes them back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]

from festina_hpc.daemon.admin_api import add_admin_routes
from festina_hpc.daemon.auth import Authenticator
from festina_hpc.daemon.festinad import Festinad, StoreRecorder
from festina_hpc.daemon.gateway import Gateway, GatewayConfig, GatewayModel
from festina_hpc.daemon.metrics import FanOut, FestinadMetrics, RequestWindow
from festina_hpc.daemon.records import CompletionRecord
from festina_hpc.errors import FestinaError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Periods:
    """Seconds between the periodic jobs."""

    reconcile_s: float = 10.0
    scale_s: float = 5.0
    consolidate_s: float = 30.0
    flush_s: float = 1.0


def make_scheduler(festinad: Festinad, recorder: StoreRecorder, periods: Periods,
                   in_flight: Callable[[], Sequence[CompletionRecord]] = list) -> AsyncIOScheduler:
    """The periodic jobs; ``in_flight`` gives the checkpoints of the requests in flight (``Gateway.in_flight``)."""

    async def flush() -> None:
        # The checkpoints are taken here, on the event loop, between handler steps, so a request that ends
        # after them carries the id they gave it; the writes go to a thread, off the loop.
        checkpoints = in_flight()
        await asyncio.get_running_loop().run_in_executor(None, recorder.flush, checkpoints)

    scheduler = AsyncIOScheduler()
    common = {"trigger": "interval", "coalesce": True, "max_instances": 1, "misfire_grace_time": None}
    scheduler.add_job(festinad.reconcile, id="reconcile", seconds=periods.reconcile_s, **common)
    scheduler.add_job(festinad.scale_tick, id="scale", seconds=periods.scale_s, **common)
    scheduler.add_job(festinad.consolidate_tick, id="consolidate", seconds=periods.consolidate_s, **common)
    scheduler.add_job(flush, id="flush", seconds=periods.flush_s, **common)
    return scheduler


async def run_festinad(festinad: Festinad, recorder: StoreRecorder, models: list[GatewayModel], host: str,
                       port: int, stop: asyncio.Event, periods: Periods,
                       gateway_config: GatewayConfig | None = None,
                       on_ready: Callable[[str], None] = lambda url: None, shutdown_s: float = 10.0,
                       auth: Authenticator | None = None, admin_open: bool = False,
                       metrics_listen: tuple[str, int] | None = None) -> None:
    """Serve until ``stop`` is set (see the module docstring); ``auth`` checks keys (None: everyone is served);
    ``admin_open`` and ``metrics_listen`` (host, port; None: no metrics) are ``[daemon]``'s."""
    await festinad.setup()
    recorder.recover()  # what the last festinad was answering when it died
    window = RequestWindow()
    config = replace(gateway_config or GatewayConfig(), shutdown_s=shutdown_s)
    # The router hears of each request that ended too: the policy learns from them (policy.feedback).
    gateway = Gateway(festinad.router, FanOut(recorder, window, festinad.router), models, config, auth=auth)
    app = gateway.app()
    add_admin_routes(app, festinad, auth, admin_open)  # /admin/*: consolidate now, drain a model (festina CLI)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_s)
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    if metrics_listen is not None:
        metrics_app = web.Application()
        FestinadMetrics(festinad, window, festinad.store.engine).mount(metrics_app)
        metrics_runner = web.AppRunner(metrics_app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await metrics_runner.setup()
    scheduler = make_scheduler(festinad, recorder, periods, gateway.in_flight)
    try:
        if metrics_runner is not None and metrics_listen is not None:
            metrics_host, metrics_port = metrics_listen
            try:
                await web.TCPSite(metrics_runner, metrics_host, metrics_port).start()
            except OSError as exc:
                raise FestinaError(f"cannot serve metrics on {metrics_host}:{metrics_port} ([daemon] "
                                   f"metrics_listen): {exc.strerror or exc}") from None
            log.info("festinad metrics on http://%s:%d/metrics", metrics_host, metrics_port)
        site = web.TCPSite(runner, host, port)
        await site.start()
        scheduler.start()
        on_ready(f"http://{host}:{port}")
        await stop.wait()
    finally:
        if scheduler.running:  # not when a listener could not bind: the error to report is that one
            scheduler.shutdown(wait=False)
        # In-flight requests finish, or are cut and recorded, before this returns (Gateway._cut_flights);
        # the runner's own shutdown_timeout is a backstop that should find no handler left.
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        recorder.flush()  # the cut requests' records too: their tokens are charged
        await festinad.close()
