"""Two processes writing one SQLite file at once, as festinad and festina-node do on a dev cluster.

festinad upserts jobs and nodes and records decisions; festina-node records energy readings and its
controller's settings. Each of those transactions reads before it writes; with SQLite's default deferred
BEGIN, a read snapshot that another process's commit made stale cannot become a write transaction, and SQLite
answers "database is locked" at once, without waiting out the busy timeout. The engine's writers begin
IMMEDIATE (festina_hpc/db/engine.py), so they queue for the write lock instead.
"""

from __future__ import annotations

import multiprocessing
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from festina_hpc.db.engine import make_engine
from festina_hpc.db.errors import DatabaseError
from festina_hpc.db.migrate import upgrade
from festina_hpc.db.store import EnergyReading, GpuRecord, JobRecord, NodeRecord, Store
from festina_hpc.policy.types import GpuSettings

RUN_S = 4.0
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _festinad_like(url: str, gpu_id: int, start_at: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """festinad's reconcile: job and node upserts, and a decision per round."""
    store = Store(make_engine(url))
    errors: list[str] = []
    rounds = 0
    while time.time() < start_at:
        time.sleep(0.01)
    while time.time() < start_at + RUN_S:
        try:
            store.upsert_jobs([JobRecord(1000 + rounds % 50, "RUNNING", name="festina-llama", node_list="n1")])
            store.upsert_nodes([NodeRecord("n1", "mixed", True, 2)])
            store.record_settings(gpu_id, GpuSettings(clock_mhz=1410), at=T0, reason="festinad")
        except DatabaseError as exc:
            errors.append(str(exc))
        rounds += 1
    out.put(("festinad", rounds, errors))


def _node_like(url: str, gpu_id: int, start_at: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """festina-node's control tick: energy readings of its GPUs, and its controller's setting."""
    store = Store(make_engine(url))
    errors: list[str] = []
    rounds = 0
    while time.time() < start_at:
        time.sleep(0.01)
    while time.time() < start_at + RUN_S:
        try:
            at = T0 + timedelta(seconds=rounds + 1)
            store.record_energy([EnergyReading(gpu_id, at, 100.0 * (rounds + 1), 300.0)])
            store.record_settings(gpu_id, GpuSettings(clock_mhz=900), at=at, reason="node")
        except DatabaseError as exc:
            errors.append(str(exc))
        rounds += 1
    out.put(("node", rounds, errors))


def test_festinad_and_node_writers_never_see_database_is_locked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'festina.db'}"
    engine = make_engine(url)
    upgrade(engine)
    store = Store(engine)
    store.upsert_nodes([NodeRecord("n1", "idle", True, 2)])
    gpu_id = store.upsert_gpus([GpuRecord("n1", 0, "h100-sxm-80gb")])[("n1", 0)]
    engine.dispose()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each, as two daemons are
    out = ctx.Queue()
    start_at = time.time() + 3.0  # both start writing together, after their imports
    procs = [ctx.Process(target=fn, args=(url, gpu_id, start_at, out)) for fn in (_festinad_like, _node_like)]
    for p in procs:
        p.start()
    results = {name: (rounds, errors) for name, rounds, errors in (out.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=30)
    for name, (rounds, errors) in results.items():
        assert rounds > 10, f"{name} wrote only {rounds} rounds"
        assert errors == [], f"{name}: {len(errors)} of {rounds} rounds failed, first: {errors[0]}"
    # Both wrote what they meant to: the node's readings are all there.
    with make_engine(url).connect() as conn:
        stored = conn.exec_driver_sql("SELECT count(*) FROM energy_samples").scalar()
    assert stored == results["node"][0]
