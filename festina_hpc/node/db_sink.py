"""Sends the node's energy readings, split among its jobs, to festina's database (``festina_hpc.db``).

Readings become ``energy_samples`` of the node's GPUs (the node and GPU rows
are created if the head node has not yet), each with the split the node made
of the interval it closes (``node/attribution.py``'s rule, carried by
``GpuReading.shares``): every job's fraction becomes its instance's share
(``energy_sample_shares``), and the database's ingest adds the interval's energy
to the instance, its Slurm job, its model, its job's account and user, and the
node (``festina_hpc.db.ingest``). An idle interval carries no share, so it goes
to the node's idle energy. That makes the database's reports add up: the jobs'
energies plus idle energy are the node's counters, whichever report is asked.

A job's instance is the one the database links to its Slurm job id, or the one
its comment names by a numeric id while no job is linked to it yet
(``Store.instances_of_jobs``). A job of neither kind (festinad has not yet
adopted a user's own festina job, or the node runs without festinad) has no
instance to charge, and the database knows no model or account for it: its
fraction goes to the idle energy rather than to a guess, logged once per job,
and is looked up again on every reading, so it is charged from the interval
after festinad records its instance. Its total stays in the node's log and in
its AdminComment.

The job and instance totals (``job_energy``, ``instance_energy``) are the
ingest's sums of those shares and nothing else: the epilog's total is only
logged, because a second writer of the same rows would make ``--by job``
disagree with the other reports wherever an interval went to idle. A
requeued job's runs therefore add up. The epilog records the job in
``slurm_jobs`` as Slurm shows it then (COMPLETING, its user and node; the store
never lets that replace a known account or a final state), so festinad's
reconcile follows every GPU job, its own or not, to its final state, end time
and exit code. The local controller's applied settings become
``decisions`` of kind ``setting``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from festina_hpc.db.store import EnergyReading, GpuRecord, JobRecord, NodeRecord, Store
from festina_hpc.node.agent import GpuReading, JobEnergy
from festina_hpc.policy.types import GpuSettings

logger = logging.getLogger(__name__)


def _at(wall_s: float) -> datetime:
    return datetime.fromtimestamp(wall_s, UTC)


def _instance_shares(reading: GpuReading, instance_of: Mapping[int, int]) -> dict[int, float]:
    """The reading's job fractions as instance shares; a job without an instance claims none (idle)."""
    shares: dict[int, float] = {}
    for share in reading.shares:
        instance_id = instance_of.get(share.job_id)
        if instance_id is not None:
            shares[instance_id] = shares.get(instance_id, 0.0) + share.fraction
    # The fractions sum to 1 up to a few ulps, far inside the ingest's tolerance (1 + 1e-9).
    return shares


class DbEnergySink:
    def __init__(self, store: Store, gpu_type: str, gpu_count: int):
        self._store = store
        self._gpu_type = gpu_type
        self._gpu_count = gpu_count
        self._gpu_ids: dict[int, int] = {}
        self._unknown_logged: set[int] = set()  # jobs without an instance, already logged

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
        jobs = {share.job_id: share.instance for r in readings for share in r.shares}
        instance_of = self._store.instances_of_jobs(jobs)
        unknown = jobs.keys() - instance_of.keys()
        for job_id in unknown - self._unknown_logged:
            logger.warning("%s: job %d: no festina instance in the database for it (comment instance %r); its "
                           "energy counts as the GPU's idle energy there until festinad records one",
                           node, job_id, jobs[job_id])
        # Only jobs still without one are remembered: every tick reads every GPU, so a job gone is forgotten.
        self._unknown_logged = unknown
        self._store.record_energy([EnergyReading(ids[r.gpu_index], _at(r.at_s), r.counter_j, r.power_w,
                                                 shares=_instance_shares(r, instance_of))
                                   for r in readings])

    def job_energy(self, node: str, record: JobEnergy) -> None:
        # The database already holds the job's energy, share by share (see the module docstring).
        self._store.upsert_jobs([JobRecord(record.job_id, "COMPLETING", user_name=record.user, node_list=node)])
        logger.info("%s: job %d: %.1f J of GPU energy over its run", node, record.job_id, record.energy_j)

    def settings(self, node: str, gpu_index: int, settings: GpuSettings, reason: str) -> None:
        """One ``setting`` decision for the GPU (festina-node's local controller applied it)."""
        self._store.record_settings(self._ids(node)[gpu_index], settings, at=datetime.now(UTC), reason=reason)
