"""``festina status``: one snapshot of the cluster from the database (and Slurm, where it answers), and its renderings.

``collect`` reads, in six bulk queries whatever the cluster's size, every node and GPU,
the instances not stopped with their GPUs, each GPU's latest power reading (only one
younger than ``stale_s``, ``node_reports.READING_STALE_S`` by default: an older one is
shown as unknown), the settings each GPU's node reported applying (its locked clock, the
SM shares in force, from the node's ``setting`` decisions) and each model's requests in
the window; Slurm's node list, when given, overrides the database's node state and power
(it is fresher: festinad writes nodes only when it reconciles).

What the node reports wins over what festinad planned: a GPU's clock is the one its node
last locked since its oldest current instance started (festina-node resets the clock of a
GPU left without jobs, so an earlier one no longer holds; a GPU without instances shows
the driver default), an instance's share the one the node last applied to its Slurm job.
While a GPU has instances but no fresh reading, its node is not reporting: the clock is
shown as unknown. ``render_text`` and ``to_json`` are pure. ``bench_status`` times the whole path
on a synthetic cluster in a temporary SQLite file.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Integer, func, select

from festina_hpc.db import node_reports
from festina_hpc.db.models import EnergySample, Gpu, InstanceGpu, ModelInstance, Node, RequestRecord
from festina_hpc.db.node_reports import READING_STALE_S
from festina_hpc.policy.types import InstancePhase
from festina_hpc.slurm.types import PowerState, SlurmNode


@dataclass(frozen=True)
class InstanceStatus:
    id: int
    model: str
    phase: str  # loading, ready, draining
    sm_pct: float  # MPS share of each of its GPUs: the one its node reported applying, else festinad's plan
    sm_pct_planned: float  # the share festinad started it with
    slurm_job_id: int | None
    endpoint_url: str | None


@dataclass(frozen=True)
class GpuStatus:
    index: int  # NVML index on its node
    gpu_type: str
    clock_mhz: int | None  # SM clock its node reported locking; None = driver default, or unknown (clock_known)
    clock_known: bool  # False: the GPU has instances but its node has sent no fresh reading
    power_w: float | None  # latest reading younger than the snapshot's stale_s; None: none (unknown)
    reading_at: datetime | None  # when that reading was taken
    sm_pct_allocated: float
    instances: tuple[InstanceStatus, ...]


@dataclass(frozen=True)
class NodeStatus:
    name: str
    state: str  # Slurm's, with flags, e.g. "idle", "mixed+drain"
    powered: bool
    gpus: tuple[GpuStatus, ...]


@dataclass(frozen=True)
class ModelSloStatus:
    model: str
    requests: int  # finished or dropped in the window
    slo_met: int
    attainment: float | None  # slo_met / requests; None without requests


@dataclass(frozen=True)
class StatusSnapshot:
    at: datetime
    window_s: float
    stale_s: float  # a node's reading older than this is not shown
    source: str  # "database+slurm" or "database" (Slurm did not answer or was not asked)
    nodes: tuple[NodeStatus, ...]
    models: tuple[ModelSloStatus, ...]

    @property
    def gpu_count(self) -> int:
        return sum(len(n.gpus) for n in self.nodes)


def collect(engine: Engine, *, now: datetime, window_s: float = 300.0,
            slurm_nodes: Sequence[SlurmNode] | None = None, stale_s: float = READING_STALE_S) -> StatusSnapshot:
    """The snapshot at ``now`` (see the module docstring)."""
    since = now - timedelta(seconds=window_s)
    fresh_since = now - timedelta(seconds=stale_s)
    with engine.connect() as conn:
        nodes = conn.execute(select(Node.id, Node.name, Node.state, Node.powered).order_by(Node.name)).all()
        gpus = conn.execute(select(Gpu.id, Gpu.node_id, Gpu.gpu_index, Gpu.gpu_type, Gpu.clock_mhz)
                            .order_by(Gpu.node_id, Gpu.gpu_index)).all()
        placed = conn.execute(
            select(InstanceGpu.gpu_id, ModelInstance.id, ModelInstance.model, ModelInstance.phase,
                   ModelInstance.sm_pct, ModelInstance.slurm_job_id, ModelInstance.endpoint_url,
                   ModelInstance.started_at)
            .join(ModelInstance, ModelInstance.id == InstanceGpu.instance_id)
            .where(ModelInstance.phase != InstancePhase.STOPPED)
            .order_by(InstanceGpu.gpu_id, ModelInstance.id)).all()
        latest = (select(EnergySample.gpu_id, func.max(EnergySample.sampled_at).label("at"))
                  .where(EnergySample.sampled_at >= fresh_since, EnergySample.sampled_at <= now)
                  .group_by(EnergySample.gpu_id).subquery())
        power_now = {gpu_id: (power_w, sampled_at) for gpu_id, power_w, sampled_at in conn.execute(
            select(EnergySample.gpu_id, EnergySample.power_w, EnergySample.sampled_at)
            .join(latest, (latest.c.gpu_id == EnergySample.gpu_id) & (latest.c.at == EnergySample.sampled_at)))}
        applied = node_reports.applied_settings(conn, ((row[0], row[7]) for row in placed))
        slo_rows = conn.execute(
            select(RequestRecord.model, func.count(), func.sum(func.cast(RequestRecord.slo_met, Integer)))
            .where(RequestRecord.arrival_at >= since, RequestRecord.arrival_at <= now)
            .group_by(RequestRecord.model).order_by(RequestRecord.model)).all()
    on_gpu: dict[int, list[InstanceStatus]] = defaultdict(list)
    for gpu_id, iid, model, phase, sm_pct, job, url, _started in placed:
        reported = applied.get(gpu_id, node_reports.AppliedSettings())
        shown = reported.sm_pct.get(job, sm_pct) if job is not None else sm_pct
        on_gpu[gpu_id].append(InstanceStatus(iid, model, InstancePhase(phase).name.lower(), shown, sm_pct, job, url))
    by_node: dict[int, list[GpuStatus]] = defaultdict(list)
    for gid, node_id, index, gpu_type, stored_clock in gpus:
        insts = tuple(on_gpu.get(gid, ()))
        power, reading_at = power_now.get(gid, (None, None))
        clock: int | None = None  # a GPU without instances: its node has reset it to the driver's default
        clock_known = True
        if insts:
            locked = applied.get(gid, node_reports.AppliedSettings()).clock_mhz
            clock_known = reading_at is not None
            if not clock_known:
                clock = None
            elif locked is not None:
                clock = locked
            else:
                clock = stored_clock  # the node has reported no lock since its instances started
        by_node[node_id].append(GpuStatus(index, gpu_type, clock, clock_known, power, reading_at,
                                          sum(i.sm_pct for i in insts), insts))
    slurm = {n.name: n for n in slurm_nodes or ()}
    node_status = []
    for nid, name, state, powered in nodes:
        live = slurm.get(name)
        if live is not None:
            state = "+".join([live.state, *(f.lower() for f in live.flags)])
            powered = live.power_state is PowerState.ON
        node_status.append(NodeStatus(name, state, powered, tuple(by_node.get(nid, ()))))
    models = tuple(ModelSloStatus(model, int(n), int(met or 0), (int(met or 0) / n) if n else None)
                   for model, n, met in slo_rows)
    return StatusSnapshot(now, window_s, stale_s, "database+slurm" if slurm_nodes is not None else "database",
                          tuple(node_status), models)


def to_json(snapshot: StatusSnapshot) -> dict[str, Any]:
    data = asdict(snapshot)
    data["at"] = snapshot.at.isoformat()
    for node in data["nodes"]:
        for gpu in node["gpus"]:
            gpu["reading_at"] = None if gpu["reading_at"] is None else gpu["reading_at"].isoformat()
    data["gpus"] = snapshot.gpu_count
    return data


def _fmt(value: float | int | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render_text(snapshot: StatusSnapshot) -> str:
    """One screen: nodes, each GPU's instances, SLO attainment per model."""
    lines = [f"festina status at {snapshot.at.isoformat(timespec='seconds')} ({snapshot.source}; "
             f"SLO window {snapshot.window_s:g} s; readings older than {snapshot.stale_s:g} s not shown)", ""]
    powered = sum(1 for n in snapshot.nodes if n.powered)
    lines.append(f"NODES  {len(snapshot.nodes)} ({powered} powered), {snapshot.gpu_count} GPUs")
    for node in snapshot.nodes:
        lines.append(f"{node.name:12} {node.state:24} {'on' if node.powered else 'off':4} {len(node.gpus)} GPUs")
        for gpu in node.gpus:
            clock = _fmt(gpu.clock_mhz, 'd', 'default') if gpu.clock_known else "unknown"
            head = (f"  gpu{gpu.index:<3} {gpu.gpu_type:14} clock {clock:>7} MHz  "
                    f"power {_fmt(gpu.power_w, '.0f'):>5} W  SM {gpu.sm_pct_allocated:5.1f}%")
            if not gpu.instances:
                lines.append(head + "  (idle)")
                continue
            lines.append(head)
            for inst in gpu.instances:
                lines.append(f"      #{inst.id:<6} {inst.model:18} {inst.phase:9} SM {inst.sm_pct:5.1f}%  "
                             f"job {_fmt(inst.slurm_job_id, 'd')}")
    lines.append("")
    lines.append(f"{'MODEL':20} {'REQUESTS':>9} {'SLO MET':>8} {'ATTAINMENT':>11}")
    if not snapshot.models:
        lines.append("(no requests in the window)")
    for m in snapshot.models:
        pct = None if m.attainment is None else 100 * m.attainment
        lines.append(f"{m.model:20} {m.requests:9d} {m.slo_met:8d} {_fmt(pct, '.1f'):>10}%")
    return "\n".join(lines)


# -- benchmark --------------------------------------------------------------------------------------


def bench_status(gpus: int = 1024, gpus_per_node: int = 8, requests: int = 20_000) -> dict[str, Any]:
    """Seconds to collect and render (text and JSON) a synthetic cluster of ``gpus`` GPUs from SQLite.

    Each GPU holds one or two instances, has a power reading and a locked clock; ``requests``
    outcomes spread over eight models fall in the window.
    """
    import json

    from festina_hpc.db import migrate
    from festina_hpc.db.engine import make_engine
    from festina_hpc.db.store import GpuRecord, NodeRecord, RequestOutcome, Store, utc_now

    with tempfile.TemporaryDirectory(prefix="festina-bench-status-") as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'status.db'}")
        try:
            migrate.upgrade(engine)
            store = Store(engine)
            now = utc_now()
            names = [f"gpu{k:04d}" for k in range((gpus + gpus_per_node - 1) // gpus_per_node)]
            store.upsert_nodes([NodeRecord(n, "mixed", True, gpus_per_node) for n in names])
            ids = store.upsert_gpus([GpuRecord(n, i, "h100-sxm-80gb", clock_mhz=1410, power_w=350.0)
                                     for n in names for i in range(gpus_per_node)])
            models = ["llama-3.1-8b", "mistral-7b", "llama-2-7b", "llama-2-13b", "mistral-nemo-12b",
                      "codellama-34b", "llama-3.1-70b", "llama-2-70b"]
            ordered = sorted(ids.items())[:gpus]
            with engine.begin() as conn:
                rows = [{"model": models[k % len(models)], "sm_pct": 50.0, "batch_cap": 64, "memory_fraction": 0.3,
                         "endpoint_url": None, "phase": InstancePhase.READY, "slurm_job_id": None,
                         "started_at": now, "ready_at": now, "stopped_at": None, "updated_at": now}
                        for k in range(len(ordered) + len(ordered) // 2)]
                conn.execute(ModelInstance.__table__.insert(), rows)  # type: ignore[attr-defined]
                instance_ids = list(conn.execute(select(ModelInstance.id).order_by(ModelInstance.id)).scalars())
                placement = [{"instance_id": iid, "rank": 0, "gpu_id": ordered[k % len(ordered)][1]}
                             for k, iid in enumerate(instance_ids)]
                conn.execute(InstanceGpu.__table__.insert(), placement)  # type: ignore[attr-defined]
                conn.execute(EnergySample.__table__.insert(),  # type: ignore[attr-defined]
                             [{"gpu_id": gid, "sampled_at": now - timedelta(seconds=5), "energy_counter_j": 1e6,
                               "power_w": 300.0 + (gid % 100)} for _, gid in ordered])
            store.record_requests([RequestOutcome(model=models[k % len(models)],
                                                  arrival_at=now - timedelta(seconds=k % 250), prompt_tokens=512,
                                                  output_tokens=64, slo_met=k % 17 != 0) for k in range(requests)])
            start = time.perf_counter()
            snapshot = collect(engine, now=now, window_s=300.0)
            text = render_text(snapshot)
            json.dumps(to_json(snapshot))
            render_s = time.perf_counter() - start
        finally:
            engine.dispose()
    return {"gpus": snapshot.gpu_count, "instances": sum(len(g.instances) for n in snapshot.nodes for g in n.gpus),
            "requests": requests, "render_s": round(render_s, 4), "lines": text.count("\n") + 1}
