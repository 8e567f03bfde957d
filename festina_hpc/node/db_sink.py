"""Sends the node's energy readings and job totals to festina's database (``festina_hpc.db``).

Readings become ``energy_samples`` of the node's GPUs (the node and GPU rows
are created if the head node has not yet); a job's total becomes its
``job_energy`` row, and, where the job comment named a numeric instance id that
the database knows, that instance's ``instance_energy`` (one job = one
instance). A requeued job's later run replaces the earlier run's total. The
local controller's applied settings become ``decisions`` of kind ``setting``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from festina_hpc.db.errors import DatabaseError
from festina_hpc.db.store import EnergyReading, GpuRecord, JobRecord, NodeRecord, Store
from festina_hpc.node.agent import GpuReading, JobEnergy
from festina_hpc.policy.types import GpuSettings

logger = logging.getLogger(__name__)


def _at(wall_s: float) -> datetime:
    return datetime.fromtimestamp(wall_s, UTC)


class DbEnergySink:
    def __init__(self, store: Store, gpu_type: str, gpu_count: int):
        self._store = store
        self._gpu_type = gpu_type
        self._gpu_count = gpu_count
        self._gpu_ids: dict[int, int] = {}

    def _ids(self, node: str) -> dict[int, int]:
        if not self._gpu_ids:
            live = self._store.load_live_state()
            node_ids = {n.name: n.id for n in live.nodes}
            if node not in node_ids:
                self._store.upsert_nodes([NodeRecord(node, "unknown", True, self._gpu_count)])
            known = {g.gpu_index: g.id for g in live.gpus if g.node_id == node_ids.get(node)}
            missing = [i for i in range(self._gpu_count) if i not in known]
            if missing:
                ids = self._store.upsert_gpus([GpuRecord(node, i, self._gpu_type) for i in missing])
                known.update({index: gpu_id for (name, index), gpu_id in ids.items() if name == node})
            self._gpu_ids = known
        return self._gpu_ids

    def readings(self, node: str, readings: Sequence[GpuReading]) -> None:
        if not readings:
            return
        ids = self._ids(node)
        self._store.record_energy([EnergyReading(ids[r.gpu_index], _at(r.at_s), r.counter_j, r.power_w)
                                   for r in readings])

    def job_energy(self, node: str, record: JobEnergy) -> None:
        # The epilog runs while Slurm shows the job COMPLETING; festinad's watcher brings the final state.
        self._store.upsert_jobs([JobRecord(record.job_id, "COMPLETING", user_name=record.user, node_list=node)])
        start, end = _at(record.started_at_s), _at(record.ended_at_s)
        self._store.set_job_energy(record.job_id, record.energy_j, from_at=start, to_at=end)
        logger.info("%s: job %d: %.1f J of GPU energy recorded", node, record.job_id, record.energy_j)
        if record.instance is not None and record.instance.isdigit():
            try:
                self._store.set_instance_energy(int(record.instance), record.energy_j, from_at=start, to_at=end)
            except DatabaseError as exc:
                logger.info("%s: job %d: instance %s not recorded: %s", node, record.job_id, record.instance, exc)

    def settings(self, node: str, gpu_index: int, settings: GpuSettings, reason: str) -> None:
        """One ``setting`` decision for the GPU (festina-node's local controller applied it)."""
        self._store.record_settings(self._ids(node)[gpu_index], settings, at=datetime.now(UTC), reason=reason)
