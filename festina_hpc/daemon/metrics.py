"""festinad's ``GET /metrics``: a Prometheus snapshot of its live state, built on each scrape.

What festinad holds in memory gives the cheap figures: per-model SLO attainment
over the last ``window_s`` and the count of finished requests (``RequestWindow``,
a ``Recorder`` the gateway hands every record to, beside the database's),
decisions per second (``DecisionRate``, fed as festinad records plans) and
powered / total nodes (its view). GPU power and energy per GPU and per model
come from the database: each GPU's last ingested reading (``energy_cursors``,
one row per GPU, joined to that sample's power and instance shares) and the
per-model hourly rollup; those queries run in a worker thread, at most once
per ``db_cache_s``, so a scrape never blocks the gateway's event loop and a
busy Prometheus never turns into a database load. A GPU's power, and the
model power split from it, is shown only while its reading is younger than
``stale_s`` (``node_reports.READING_STALE_S``) at the scrape's own time, so a
GPU whose node stopped reporting drops out of
``festina_gpu_power_watts`` instead of staying at its last value; its energy
counter stays (a counter only grows, and the last one is still its total).
The figures are formatted by the pure registry in
``festina_hpc.accounting.metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from aiohttp import web
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from festina_hpc.accounting.metrics import (
    GpuFigures,
    MetricsSnapshot,
    ModelFigures,
    ShareFigures,
    build_registry,
    exposition,
)
from festina_hpc.daemon.records import CompletionRecord, Recorder
from festina_hpc.db import node_reports
from festina_hpc.db.models import (
    EnergyCursor,
    EnergySample,
    EnergySampleShare,
    Gpu,
    InstanceGpu,
    ModelEnergyHourly,
    ModelInstance,
    Node,
)
from festina_hpc.db.node_reports import READING_STALE_S
from festina_hpc.policy.types import InstancePhase, NodePower

if TYPE_CHECKING:
    from festina_hpc.daemon.festinad import Festinad

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 300.0  # SLO attainment over the last five minutes: recent enough to alert on
DEFAULT_DB_CACHE_S = 10.0


class RequestWindow:
    """A ``Recorder`` keeping, per model, the SLO outcomes of the last ``window_s`` and a running count."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._recent: dict[str, deque[tuple[float, bool]]] = {}
        self.totals: dict[str, int] = {}

    def record(self, record: CompletionRecord) -> None:
        self._recent.setdefault(record.model, deque()).append((self._clock(), record.slo_met))
        self.totals[record.model] = self.totals.get(record.model, 0) + 1

    def attainment(self) -> dict[str, float | None]:
        """Per model seen so far: the fraction of its requests of the window that met their SLO (None: none)."""
        cutoff_s = self._clock() - self.window_s
        result: dict[str, float | None] = {}
        for model, recent in self._recent.items():
            while recent and recent[0][0] < cutoff_s:
                recent.popleft()
            result[model] = sum(met for _, met in recent) / len(recent) if recent else None
        return result


class FanOut:
    """A ``Recorder`` handing each record to several (the database's and the metrics' window)."""

    def __init__(self, *recorders: Recorder):
        self._recorders = recorders

    def record(self, record: CompletionRecord) -> None:
        for recorder in self._recorders:
            try:
                recorder.record(record)
            except Exception:  # a failing recorder must not starve the others (the Recorder contract)
                log.exception("recorder %s failed", type(recorder).__name__)


class DecisionRate:
    """Counts the decisions festinad records; their rate over the last ``window_s``."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._recent: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, count: int) -> None:
        if count > 0:
            self._recent.append((self._clock(), count))
            self.total += count

    def per_s(self) -> float:
        cutoff_s = self._clock() - self.window_s
        while self._recent and self._recent[0][0] < cutoff_s:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self.window_s


@dataclass(frozen=True)
class DbFigures:
    """What the database knows of energy: per GPU (node, index) and per model, with the time of each reading."""

    gpus: tuple[tuple[GpuFigures, datetime], ...] = ()  # each GPU's last reading and when it was taken
    model_energy_j: dict[str, float] = field(default_factory=dict)
    model_power: tuple[tuple[str, datetime, float], ...] = ()  # (model, reading's time, its share of the power)
    shares: tuple[tuple[ShareFigures, datetime], ...] = ()  # each serving job's share, its GPU's reading's time

    def fresh(self, since: datetime) -> tuple[tuple[GpuFigures, ...], dict[str, float], tuple[ShareFigures, ...]]:
        """GPU figures without the power and clock of readings older than ``since``; model power and
        shares from the newer ones (a node that stopped reporting may have changed both since)."""
        gpus = tuple(gpu if at >= since else replace(gpu, power_w=None, clock_mhz=None) for gpu, at in self.gpus)
        power: dict[str, float] = {}
        for model, at, power_w in self.model_power:
            if at >= since:
                power[model] = power.get(model, 0.0) + power_w
        return gpus, power, tuple(share for share, at in self.shares if at >= since)


def _aware(at: datetime) -> datetime:
    # SQLite gives naive datetimes; every time festina stores is UTC.
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def db_figures(engine: Engine) -> DbFigures:
    """Each GPU's last reading, its power split by that sample's shares, the per-model energy rollup, and
    what each GPU's node reported applying: its locked clock and its serving jobs' shares (as ``festina status``:
    only since the GPU's oldest current instance started, its node resets the clock of a GPU left idle)."""
    last = (select(Node.name, Gpu.gpu_index, EnergyCursor.gpu_id, EnergyCursor.sampled_at,
                   EnergyCursor.energy_counter_j, EnergySample.power_w)
            .join(Gpu, Gpu.id == EnergyCursor.gpu_id).join(Node, Node.id == Gpu.node_id)
            .outerjoin(EnergySample, (EnergySample.gpu_id == EnergyCursor.gpu_id)
                       & (EnergySample.sampled_at == EnergyCursor.sampled_at)))
    # Shares of each GPU's last sample: primary-key lookups, one per GPU and instance.
    shares = (select(ModelInstance.model, EnergySample.sampled_at, EnergySample.power_w, EnergySampleShare.share_frac)
              .select_from(EnergyCursor)
              .join(EnergySampleShare, (EnergySampleShare.gpu_id == EnergyCursor.gpu_id)
                    & (EnergySampleShare.sampled_at == EnergyCursor.sampled_at))
              .join(EnergySample, (EnergySample.gpu_id == EnergyCursor.gpu_id)
                    & (EnergySample.sampled_at == EnergyCursor.sampled_at))
              .join(ModelInstance, ModelInstance.id == EnergySampleShare.instance_id))
    energy = select(ModelEnergyHourly.model, func.sum(ModelEnergyHourly.energy_j)).group_by(ModelEnergyHourly.model)
    placed = (select(InstanceGpu.gpu_id, ModelInstance.slurm_job_id, ModelInstance.sm_pct, ModelInstance.started_at)
              .join(ModelInstance, ModelInstance.id == InstanceGpu.instance_id)
              .where(ModelInstance.phase != InstancePhase.STOPPED))
    with engine.connect() as connection:
        on_gpus = connection.execute(placed).all()
        applied = node_reports.applied_settings(connection, ((gpu_id, at) for gpu_id, _job, _pct, at in on_gpus))
        gpus: list[tuple[GpuFigures, datetime]] = []
        where: dict[int, tuple[str, int, datetime]] = {}
        for node, index, gpu_id, at, counter_j, power_w in connection.execute(last):
            clock = applied[gpu_id].clock_mhz if gpu_id in applied else None
            gpus.append((GpuFigures(node, index, power_w, counter_j, clock), _aware(at)))
            where[gpu_id] = (node, index, _aware(at))
        power = tuple((model, _aware(at), power_w * share)
                      for model, at, power_w, share in connection.execute(shares) if power_w is not None)
        model_energy = {model: float(total or 0.0) for model, total in connection.execute(energy)}
    job_shares = tuple(
        (ShareFigures(where[gpu_id][0], where[gpu_id][1], job, applied.get(gpu_id, node_reports.AppliedSettings())
                      .sm_pct.get(job, pct)), where[gpu_id][2])
        for gpu_id, job, pct, _at in on_gpus if job is not None and gpu_id in where)
    return DbFigures(tuple(sorted(gpus, key=lambda g: (g[0].node, g[0].gpu_index))), model_energy, power,
                     tuple(sorted(job_shares, key=lambda s: (s[0].node, s[0].gpu_index, s[0].job_id))))


class FestinadMetrics:
    """Builds festinad's snapshot (see the module docstring); ``handle`` is the ``GET /metrics`` route."""

    def __init__(self, festinad: Festinad, window: RequestWindow, engine: Engine | None,
                 db_cache_s: float = DEFAULT_DB_CACHE_S, clock: Callable[[], float] = time.monotonic,
                 stale_s: float = READING_STALE_S, wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        """``clock`` (monotonic) paces the database queries; ``wall_clock`` (UTC) ages the readings."""
        self._festinad = festinad
        self.window = window
        self._engine = engine
        self._db_cache_s = db_cache_s
        self._clock = clock
        self._stale_s = stale_s
        self._wall = wall_clock
        self._db: DbFigures = DbFigures()
        self._db_at_s: float | None = None

    async def _db_figures(self) -> DbFigures:
        now_s = self._clock()
        if self._engine is None or (self._db_at_s is not None and now_s - self._db_at_s < self._db_cache_s):
            return self._db
        try:
            self._db = await asyncio.to_thread(db_figures, self._engine)
        except SQLAlchemyError as exc:
            # A scrape still answers with festinad's own figures; the energy ones come back with the database.
            log.warning("metrics: database figures unavailable: %s", exc)
            self._db = DbFigures()
        self._db_at_s = now_s
        return self._db

    async def snapshot(self) -> MetricsSnapshot:
        db = await self._db_figures()
        # Aged at the scrape, not at the query: a cached reading must not outlive the stale period either.
        gpus, model_power, shares = db.fresh(self._wall() - timedelta(seconds=self._stale_s))
        # Read on the event loop: the view and the windows are only ever changed there.
        attainment = self.window.attainment()
        names = sorted({*attainment, *db.model_energy_j, *model_power})
        models = tuple(ModelFigures(m, model_power.get(m), db.model_energy_j.get(m), attainment.get(m),
                                    self.window.totals.get(m)) for m in names)
        powered = nodes = None
        cluster = self._festinad.cluster  # None until setup() has read Slurm's nodes
        if cluster is not None:
            nodes = len(cluster.node_list)
            powered = sum(1 for n in cluster.node_list if n.power is NodePower.ON)
        decisions = self._festinad.decision_rate
        return MetricsSnapshot(gpus=gpus, models=models, decisions_per_s=decisions.per_s(),
                               decisions=decisions.total, powered_nodes=powered, nodes=nodes, shares=shares)

    async def handle(self, request: web.Request) -> web.Response:
        body, content_type = exposition(build_registry(await self.snapshot()))
        return web.Response(body=body, headers={"Content-Type": content_type})

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.handle)


__all__ = ["DbFigures", "DecisionRate", "FanOut", "FestinadMetrics", "RequestWindow", "db_figures"]
