"""What the nodes report of their GPUs, as the database holds it: fresh power readings and applied settings.

festina-node writes two things about a GPU: its energy readings (``energy_samples``, every
control tick, idle or not) and, whenever its local
controller changes something, a ``setting`` decision whose details are the ``GpuSettings``
it put in force (``clock_mhz``: the locked clock, absent when unchanged; ``sm_pct``: shares
keyed by Slurm job id). ``festina status`` and festinad's ``/metrics`` read both through here.

A reading older than ``READING_STALE_S`` is stale: the node stopped writing (festina-node, its
node or the database is down). A stale reading is
shown as unknown and left out of ``/metrics``, never frozen at its last value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, select

from festina_hpc.db.models import Decision

# festina-node samples every control tick (``control_period_s``, 2 s by default). 30 s is fifteen
# ticks: a node a few ticks late (a slow database write, a loaded node) is not shown as unknown,
# and a GPU whose node stopped reporting loses its power well inside one minute,
# the period a dashboard or an alert on ``festina_gpu_power_watts`` looks back over.
READING_STALE_S = 30.0


@dataclass
class AppliedSettings:
    """What festina-node's controller last put in force on one GPU (from its ``setting`` decisions)."""

    clock_mhz: int | None = None  # the last clock it locked; None: none reported
    clock_at: datetime | None = None
    sm_pct: dict[int, float] = field(default_factory=dict)  # Slurm job id -> the share last applied


def applied_settings(conn: Connection, placed: Iterable[tuple[int, datetime]]) -> dict[int, AppliedSettings]:
    """Per occupied GPU id, the settings its node reported applying since its oldest current instance started
    (later ones win); ``placed`` is each current instance's (GPU id, start time).

    Earlier settings no longer hold: festina-node resets the clock of a GPU left without jobs and does not
    record the reset. The node records changes only, so the state in force is the fold of its decisions,
    oldest first.
    """
    since: dict[int, datetime] = {}
    for gpu_id, started_at in placed:
        since[gpu_id] = min(started_at, since.get(gpu_id, started_at))
    if not since:
        return {}
    query = (select(Decision.gpu_id, Decision.decided_at, Decision.details)
             .where(Decision.kind == "setting", Decision.decided_at >= min(since.values()),
                    Decision.gpu_id.in_(sorted(since)))
             .order_by(Decision.decided_at, Decision.id))
    result: dict[int, AppliedSettings] = {}
    for gpu_id, decided_at, details in conn.execute(query):
        if decided_at < since[gpu_id]:
            continue
        applied = result.setdefault(gpu_id, AppliedSettings())
        clock = details.get("clock_mhz")
        if isinstance(clock, int) and not isinstance(clock, bool):
            applied.clock_mhz, applied.clock_at = clock, decided_at
        for job, pct in (details.get("sm_pct") or {}).items():
            # JSON keys are strings (store._jsonable); a key that is not a job id is not the node's.
            if str(job).isdigit() and isinstance(pct, int | float):
                applied.sm_pct[int(job)] = float(pct)
    return result


__all__ = ["READING_STALE_S", "AppliedSettings", "applied_settings"]
