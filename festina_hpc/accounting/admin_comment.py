"""A job's GPU energy written into its Slurm AdminComment, so ``sacct -o AdminComment`` shows it.

Slurm's own GPU energy figure is empty on NVIDIA GPUs (its NVML energy read is a stub); festina's
is the job's ``job_energy`` rollup. ``energy_comment`` formats it (``festina_energy_j=<int>,
festina_energy_kwh=<3 decimals>``), ``write_energy_comment`` hands it to the Slurm client.

Verified on the local Slurm 22.05 cluster (tests/accounting/test_admin_comment.py): slurmctld
accepts ``scontrol update JobId=N AdminComment=...`` while a job runs, and refuses it once the job
has finished ("Job has already finished for job N"), whether or not the job is still within
MinJobAge, and already in the Epilog (the job is COMPLETING; tests/node/test_live_metrics.py);
without slurmdbd (``AccountingStorageType=accounting_storage/none``, as here) sacct shows nothing
at all. So festina-node writes the running total while the job runs (``festina_hpc.node.metrics``,
every ``admin_comment_period_s``) and the last value written is what accounting keeps;
a refusal for a finished job is an outcome, not an error. Sites with slurmdbd could also amend a
finished job in the database (``sacctmgr modify job where jobid=N set AdminComment=...``); that is
not tried here, where there is no slurmdbd.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select

from festina_hpc.db.models import JobEnergy
from festina_hpc.slurm.client import SlurmClient
from festina_hpc.slurm.errors import SlurmCommandError

J_PER_KWH = 3_600_000.0


@dataclass(frozen=True)
class CommentOutcome:
    job_id: int
    text: str  # what was (or would have been) written; "" when festina has no energy for the job
    written: bool
    reason: str = ""  # why not, when not written


def energy_comment(energy_j: float) -> str:
    """The AdminComment text for a job's GPU energy."""
    return f"festina_energy_j={round(energy_j)},festina_energy_kwh={energy_j / J_PER_KWH:.3f}"


def job_energy_j(engine: Engine, job_id: int) -> float | None:
    """festina's measured energy of a Slurm job so far, or None when it has none."""
    with engine.connect() as connection:
        return connection.execute(select(JobEnergy.energy_j).where(JobEnergy.job_id == job_id)).scalar_one_or_none()


def write_energy_comment(client: SlurmClient, engine: Engine, job_id: int) -> CommentOutcome:
    """Write the job's energy so far into its AdminComment; a finished job's refusal is reported, not raised."""
    energy_j = job_energy_j(engine, job_id)
    if energy_j is None:
        return CommentOutcome(job_id, "", False, f"no energy recorded for job {job_id}")
    text = energy_comment(energy_j)
    try:
        client.set_admin_comment(job_id, text)
    except SlurmCommandError as exc:
        if "already finished" in exc.stderr:
            return CommentOutcome(job_id, text, False, "Slurm refuses AdminComment updates of a finished job")
        raise
    return CommentOutcome(job_id, text, True)


__all__ = ["CommentOutcome", "energy_comment", "job_energy_j", "write_energy_comment"]
