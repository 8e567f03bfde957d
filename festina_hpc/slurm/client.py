"""The ``SlurmClient`` protocol: the operations festina needs from Slurm, and their contracts.

Backends (``cli``: Slurm's commands; ``pyslurm``: the C API where its version
matches) carry out exactly what they are asked and decide nothing. Contracts:

- Inputs (job ids, node names, reasons, specs) are validated before anything
  runs; bad input raises ``SlurmInputError``, a failed operation
  ``SlurmCommandError`` (one line: command, exit code, stderr).
- ``list_jobs``/``list_nodes`` return everything slurmctld holds (finished jobs
  within MinJobAge included); callers filter.
- ``requeue`` moves a job onto ``nodelist``: a running job is requeued held,
  re-targeted once pending, made eligible at once and released; a pending
  one is held, re-targeted and released. Slurm cannot re-target a running job.
- ``get_jobs`` answers for many ids in one call (festinad watches every starting job with it, one
  call per period however many start); an id missing from its answer is a job Slurm no longer knows.
- ``cancel`` of a job that no longer exists is not an error (idempotent).
- ``set_admin_comment`` replaces the whole AdminComment; its text is one ``key=value[,key=value]``
  token (no spaces), validated like every other argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from festina_hpc.slurm.types import ServingJobSpec, SlurmJob, SlurmNode


class SlurmClient(Protocol):
    def version(self) -> tuple[int, int]:
        """The cluster's Slurm (major, minor), e.g. (22, 5)."""
        ...

    def submit(self, spec: ServingJobSpec) -> int:
        """Submit a serving job; its job id."""
        ...

    def cancel(self, job_id: int) -> None: ...

    def hold(self, job_id: int) -> None: ...

    def release(self, job_id: int) -> None: ...

    def requeue(self, job_id: int, nodelist: Sequence[str], timeout_s: float = 30.0) -> None:
        """Move the job onto ``nodelist`` (see the module's contract)."""
        ...

    def get_job(self, job_id: int) -> SlurmJob | None:
        """The job, or None when slurmctld no longer knows it."""
        ...

    def get_jobs(self, job_ids: Sequence[int]) -> dict[int, SlurmJob]:
        """Those of ``job_ids`` slurmctld knows, by id, in one call (none for no ids)."""
        ...

    def list_jobs(self) -> tuple[SlurmJob, ...]: ...

    def list_nodes(self) -> tuple[SlurmNode, ...]: ...

    def drain(self, node: str, reason: str) -> None: ...

    def resume(self, node: str) -> None: ...

    def set_admin_comment(self, job_id: int, text: str) -> None:
        """Replace the job's AdminComment (an operator's field ``sacct`` shows; needs Slurm admin rights).

        Slurm 22.05 refuses it for a finished job ("Job has already finished"): a
        ``SlurmCommandError`` whose ``stderr`` says so.
        """
        ...
