"""``festina bench db``: energy-sample ingest rate into SQLite and PostgreSQL, and accounting report latency.

A synthetic cluster (16 nodes of 8 GPUs, 8 models, a quarter of the GPUs idle, the rest holding one or
two instances of jobs of 8 accounts) reports one reading per GPU per second; the readings are
generated as they are ingested (the rate includes making them, so it is a lower bound) and go
through ``Store.ingest_energy`` exactly as festinad's would, rollups included. Then every shipped
accounting query runs over the whole span and over its last day; ``report_max_s`` is the slowest.

SQLite gets a file in a temporary folder; PostgreSQL a schema of its own in the database at
``postgres_url``, dropped at the end, so the benchmark never touches festina's own database.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.engine import URL, make_url

from festina_hpc.db import migrate
from festina_hpc.db.accounting import query_names, run_query
from festina_hpc.db.engine import first_line, make_engine, mask_url
from festina_hpc.db.errors import DatabaseUnavailable
from festina_hpc.db.ingest import EnergyReading
from festina_hpc.db.store import DEFAULT_BATCH_SIZE, GpuRecord, JobRecord, NodeRecord, RequestOutcome, Store

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
NODES, GPUS_PER_NODE = 16, 8
MODELS = ("llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "mistral-nemo-12b", "llama-2-7b", "llama-2-13b",
          "codellama-34b", "llama-2-70b")
ACCOUNTS = 8
START = datetime(2026, 3, 1, tzinfo=UTC)
PROGRESS_EVERY_S = 64  # simulated seconds (of 128 readings each) between progress reports
REQUESTS_PER_SAMPLE = 0.01  # one request outcome per 100 samples: the SLO and per-token queries have rows to read


@dataclass(frozen=True)
class BackendFigures:
    ingest_s: float
    ingest_per_s: float
    reports_s: dict[str, float]  # query (and range) -> seconds


def _cluster(store: Store) -> list[tuple[int, dict[int, float]]]:
    """Nodes, GPUs, jobs and instances; returns each GPU's id and the shares its readings carry."""
    names = [f"bench{n:03d}" for n in range(NODES)]
    store.upsert_nodes([NodeRecord(name, "mixed", True, GPUS_PER_NODE) for name in names])
    gpus = store.upsert_gpus([GpuRecord(name, index, "h100-sxm-80gb") for name in names
                              for index in range(GPUS_PER_NODE)])
    at = START - timedelta(hours=1)
    plan: list[tuple[int, dict[int, float]]] = []
    job_id = 1000
    for k, key in enumerate(sorted(gpus)):
        gpu = gpus[key]
        shares: dict[int, float] = {}
        if k % 4 != 3:  # every fourth GPU idle: its energy is the node's idle energy
            split = (1.0,) if k % 2 else (0.6, 0.3)
            for rank, share in enumerate(split):
                job_id += 1
                store.upsert_jobs([JobRecord(job_id, "RUNNING", user_name=f"user{job_id % 32}",
                                             account=f"acct{job_id % ACCOUNTS}", start_at=at)])
                instance = store.create_instance(MODELS[(k + rank) % len(MODELS)], [gpu], at=at,
                                                 sm_pct=100.0 * share if share < 1 else 100.0,
                                                 memory_fraction=0.45 if share < 1 else 0.9, slurm_job_id=job_id)
                shares[instance] = share
        plan.append((gpu, shares))
    return plan


def _readings(plan: list[tuple[int, dict[int, float]]], samples: int,
              progress: Callable[[int], None] | None = None) -> Iterator[EnergyReading]:
    """One reading per GPU per second, in time order, ``samples`` in all; power varies with the GPU and time.

    ``progress`` hears how many readings were handed out, every ``PROGRESS_EVERY_S`` simulated seconds.
    """
    counters = [0.0] * len(plan)
    handed = 0
    second = 0
    while handed < samples:
        at = START + timedelta(seconds=second)  # one time object for all GPUs of a second
        for k, (gpu, shares) in enumerate(plan[:samples - handed]):
            power_w = 80.0 + 5.0 * (k % 7) + (250.0 if shares and (second // 600 + k) % 3 else 0.0)
            counters[k] += power_w
            yield EnergyReading(gpu, at, counters[k], power_w, shares)
        handed += min(len(plan), samples - handed)
        second += 1
        if progress is not None and second % PROGRESS_EVERY_S == 0:
            progress(handed)


def _requests(plan: list[tuple[int, dict[int, float]]], samples: int) -> Iterator[list[RequestOutcome]]:
    count = int(samples * REQUESTS_PER_SAMPLE)
    span_s = max(1, samples // len(plan))
    instances = [instance for _gpu, shares in plan for instance in shares]
    batch: list[RequestOutcome] = []
    for n in range(count):
        arrival = START + timedelta(seconds=(n * span_s) / max(count, 1))
        batch.append(RequestOutcome(MODELS[n % len(MODELS)], arrival, 256 + n % 512, 64 + n % 256, n % 10 != 0,
                                    instance_id=instances[n % len(instances)], ttft_s=0.05 + (n % 20) / 100,
                                    user_name=f"user{n % 32}", account=f"acct{n % ACCOUNTS}"))
        if len(batch) == 10_000:
            yield batch
            batch = []
    if batch:
        yield batch


# Told (phase, done, total, unit) as a benchmark moves: readings ingested, then report queries run.
Progress = Callable[[str, int, int, str], None]


def _run_backend(engine: Engine, backend: str, samples: int, batch_size: int,
                 progress: Progress | None = None) -> BackendFigures:
    migrate.upgrade(engine)
    store = Store(engine)
    plan = _cluster(store)
    for batch in _requests(plan, samples):
        store.record_requests(batch)
    def ingested(done: int) -> None:
        if progress is not None:
            progress(f"{backend} ingest", done, samples, "samples")

    ingested(0)
    started = time.perf_counter()
    stats = store.ingest_energy(_readings(plan, samples, ingested if progress else None), batch_size=batch_size)
    ingest_s = time.perf_counter() - started
    assert stats.stored == samples, stats
    ingested(samples)
    end = START + timedelta(seconds=samples // len(plan) + 1)
    ranges = {"all": (START, end + timedelta(hours=1)), "last day": (end - timedelta(days=1), end)}
    reports: dict[str, float] = {}
    runs = [(name, label) for name in query_names() for label in ranges]
    for done, (name, label) in enumerate(runs):
        if progress is not None:
            progress(f"{backend} reports", done, len(runs), "queries")
        since, until = ranges[label]
        started = time.perf_counter()
        run_query(engine, name, since=since, until=until, limit=50)
        reports[f"{name} ({label})"] = time.perf_counter() - started
    if progress is not None:
        progress(f"{backend} reports", len(runs), len(runs), "queries")
    return BackendFigures(ingest_s, samples / ingest_s, reports)


def _postgres_schema(admin_url: str) -> tuple[URL, str]:
    """A fresh schema in the database at ``admin_url``; the URL that uses it."""
    base = make_url(admin_url)
    if base.drivername in ("postgresql", "postgres"):
        base = base.set(drivername="postgresql+psycopg")
    schema = f"festina_bench_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(_libpq(base), autocommit=True, connect_timeout=5) as connection:
            connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"database {mask_url(base)} does not answer: {first_line(exc)}") from None
    return base.update_query_dict({"options": f"-csearch_path={schema}"}), schema


def _libpq(url: URL) -> str:
    return url.set(drivername="postgresql", query={}).render_as_string(hide_password=False)


def run_db_bench(samples: int, *, postgres_url: str | None = DEFAULT_POSTGRES_URL,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: Progress | None = None) -> dict[str, Any]:
    """Ingest ``samples`` readings into SQLite (and PostgreSQL unless ``postgres_url`` is None); time the reports.

    ``progress`` is told (phase, done, total, unit) as the run moves.
    """
    figures: dict[str, Any] = {"samples": samples, "batch_size": batch_size, "gpus": NODES * GPUS_PER_NODE}
    per_backend: dict[str, BackendFigures] = {}
    # PostgreSQL's schema first: a database that does not answer is said at once, not after SQLite's run.
    postgres = _postgres_schema(postgres_url) if postgres_url else None
    figures["postgresql_url"] = mask_url(postgres[0].set(query={})) if postgres else None
    try:
        with tempfile.TemporaryDirectory(prefix="festina-bench-db-") as folder:
            engine = make_engine(f"sqlite:///{Path(folder) / 'bench.db'}")
            try:
                per_backend["sqlite"] = _run_backend(engine, "sqlite", samples, batch_size, progress)
            finally:
                engine.dispose()
        if postgres:
            engine = make_engine(postgres[0])
            try:
                per_backend["postgresql"] = _run_backend(engine, "postgresql", samples, batch_size, progress)
            finally:
                engine.dispose()
    finally:
        if postgres:
            with psycopg.connect(_libpq(postgres[0]), autocommit=True) as connection:
                connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(postgres[1])))
    for backend in ("sqlite", "postgresql"):
        result = per_backend.get(backend)
        figures[f"{backend}_ingest_per_s"] = round(result.ingest_per_s, 1) if result else None
        figures[f"{backend}_ingest_s"] = round(result.ingest_s, 3) if result else None
    slowest = max(((seconds, f"{backend}: {name}") for backend, result in per_backend.items()
                   for name, seconds in result.reports_s.items()), default=(0.0, ""))
    figures["report_max_s"] = round(slowest[0], 4)
    figures["report_max_query"] = slowest[1]
    figures["reports_s"] = {backend: {name: round(s, 4) for name, s in result.reports_s.items()}
                            for backend, result in per_backend.items()}
    return figures


__all__ = ["DEFAULT_POSTGRES_URL", "run_db_bench"]
