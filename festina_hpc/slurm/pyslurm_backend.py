"""``SlurmClient`` over pyslurm (the Slurm C API), for clusters whose Slurm matches pyslurm's.

pyslurm is built against one Slurm release (25.11 for the 25.11.x wheels) and
refuses to build against another, so it is absent where Debian's 22.05 runs;
``make_slurm_client`` only picks this backend when ``import pyslurm`` works
and its major.minor equals the cluster's. Written against pyslurm 25.x's
documented API: ``Jobs.load``, ``Job.load/cancel/hold/release/requeue/modify``,
``JobSubmitDescription(script=...).load_sbatch_options()/submit()``,
``Nodes.load``, ``Node.modify(Node(state=..., reason=...))``. The batch
script is the same one the CLI backend submits, so both backends ask Slurm for
exactly the same job. The module is passed in, so tests can use a stand-in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from festina_hpc.slurm import parse, validate
from festina_hpc.slurm.errors import SlurmCommandError, SlurmError
from festina_hpc.slurm.sbatch import render_script
from festina_hpc.slurm.types import FINISHED_JOB_STATES, Gres, ServingJobSpec, SlurmJob, SlurmNode

_RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED", "COMPLETING"})


def pyslurm_version(module: Any) -> tuple[int, int]:
    text = getattr(module, "__version__", None)
    if text is None and callable(getattr(module, "version", None)):
        text = module.version()
    return parse.parse_version(str(text))


def _gres_from_dict(value: Any) -> tuple[Gres, ...]:
    """pyslurm's GRES dicts: ``{"gpu:h100": 2, "mps": 200}`` (counts may be strings with IDX detail)."""
    if not value:
        return ()
    if isinstance(value, str):
        return parse.parse_gres(value)
    out = []
    for key, count in dict(value).items():
        name, _, gres_type = str(key).removeprefix("gres:").removeprefix("gres/").partition(":")
        number = count if isinstance(count, int) else parse.parse_gres(f"{name}:{count}")
        if isinstance(number, tuple):
            number = number[0].count if number else 0
        out.append(Gres(name, gres_type or None, int(number)))
    return tuple(out)


class PyslurmSlurmClient:
    """``SlurmClient`` over a pyslurm module (``import pyslurm``, or a stand-in in tests)."""

    def __init__(self, module: Any, *, sleep: Callable[[float], None] = time.sleep,
                 poll_interval_s: float = 0.25) -> None:
        self._m = module
        self._sleep = sleep
        self._poll_interval_s = poll_interval_s

    @contextmanager
    def _rpc(self, what: str) -> Iterator[None]:
        """pyslurm raises RPCError (and ValueError for bad values); one place maps them onto ours."""
        try:
            yield
        except SlurmError:
            raise
        except Exception as exc:  # noqa: BLE001 - the C API's errors arrive as several types
            raise SlurmCommandError(["pyslurm", what], f"{type(exc).__name__}", None, str(exc)) from exc

    def version(self) -> tuple[int, int]:
        return pyslurm_version(self._m)

    def _job(self, raw: Any) -> SlurmJob:
        return SlurmJob(
            job_id=int(raw.id), name=raw.name or "", state=str(raw.state or "UNKNOWN").upper(),
            reason=raw.state_reason or "None", nodes=parse.expand_hostlist(raw.allocated_nodes or ""),
            gres=_gres_from_dict(getattr(raw, "gres_per_node", None)), gres_detail=(),
            comment=raw.comment or "", user=raw.user_name or "", account=raw.account or "",
            partition=raw.partition or "", required_nodes=parse.expand_hostlist(raw.required_nodes or ""),
            excluded_nodes=parse.expand_hostlist(raw.excluded_nodes or ""),
            restart_count=int(getattr(raw, "requeue_count", 0) or 0),
            submit_time_s=getattr(raw, "submit_time", None), start_time_s=getattr(raw, "start_time", None))

    def _node(self, raw: Any) -> SlurmNode:
        words = [w for w in str(raw.state or "UNKNOWN").upper().split("+") if w]
        return SlurmNode(
            name=raw.name, state=words[0].lower(), flags=tuple(words[1:]), reason=raw.reason or "",
            cpus=int(getattr(raw, "total_cpus", 0) or 0), alloc_cpus=int(getattr(raw, "allocated_cpus", 0) or 0),
            gres=_gres_from_dict(raw.configured_gres), gres_used=_gres_from_dict(raw.allocated_gres),
            partitions=tuple(raw.partitions or ()), features=tuple(getattr(raw, "available_features", None) or ()))

    @staticmethod
    def _values(collection: Any) -> list[Any]:
        return list(collection.values()) if isinstance(collection, Mapping) or hasattr(collection, "values") \
            else list(collection)

    def list_jobs(self) -> tuple[SlurmJob, ...]:
        with self._rpc("Jobs.load"):
            return tuple(self._job(j) for j in self._values(self._m.Jobs.load()))

    def get_jobs(self, job_ids: Sequence[int]) -> dict[int, SlurmJob]:
        # One Jobs.load (one RPC for every job) rather than a Job.load per id.
        wanted = {validate.job_id(j) for j in job_ids}
        if not wanted:
            return {}
        return {job.job_id: job for job in self.list_jobs() if job.job_id in wanted}

    def list_nodes(self) -> tuple[SlurmNode, ...]:
        with self._rpc("Nodes.load"):
            return tuple(self._node(n) for n in self._values(self._m.Nodes.load()))

    def get_job(self, job_id: int) -> SlurmJob | None:
        job_id = validate.job_id(job_id)
        try:
            raw = self._m.Job.load(job_id)
        except Exception as exc:  # noqa: BLE001
            if "Invalid job id" in str(exc):
                return None
            raise SlurmCommandError(["pyslurm", "Job.load", str(job_id)], type(exc).__name__, None,
                                    str(exc)) from exc
        return self._job(raw)

    def submit(self, spec: ServingJobSpec) -> int:
        script = render_script(spec)
        with self._rpc("JobSubmitDescription.submit"):
            desc = self._m.JobSubmitDescription(script=script)
            desc.load_sbatch_options()
            return int(desc.submit())

    def cancel(self, job_id: int) -> None:
        with self._rpc("Job.cancel"):
            self._m.Job(validate.job_id(job_id)).cancel()

    def hold(self, job_id: int) -> None:
        with self._rpc("Job.hold"):
            self._m.Job(validate.job_id(job_id)).hold()

    def release(self, job_id: int) -> None:
        with self._rpc("Job.release"):
            self._m.Job(validate.job_id(job_id)).release()

    def requeue(self, job_id: int, nodelist: Sequence[str], timeout_s: float = 30.0) -> None:
        job_id = validate.job_id(job_id)
        nodes = validate.node_names(nodelist, "nodelist")
        if not nodes:
            raise SlurmError(f"requeue of job {job_id} needs at least one node")
        job = self.get_job(job_id)
        if job is None:
            raise SlurmError(f"job {job_id} does not exist")
        with self._rpc("Job.requeue"):
            if job.state in _RUNNING_STATES:
                self._m.Job(job_id).requeue(hold=True)
            elif job.state == "PENDING":
                if not job.held:
                    self._m.Job(job_id).hold()
            else:
                raise SlurmError(f"job {job_id} is {job.state}; only pending or running jobs can be requeued")
        deadline = time.monotonic() + timeout_s
        while (current := self.get_job(job_id)) is not None and current.state != "PENDING":
            if current.state in FINISHED_JOB_STATES or time.monotonic() >= deadline:
                raise SlurmError(f"job {job_id} is {current.state}, not pending, after requeue")
            self._sleep(self._poll_interval_s)
        with self._rpc("Job.modify"):
            self._m.Job(job_id).modify(self._m.JobSubmitDescription(required_nodes=",".join(nodes),
                                                                    begin_time="now"))
            self._m.Job(job_id).release()

    def drain(self, node: str, reason: str) -> None:
        with self._rpc("Node.modify"):
            self._m.Node(validate.node_name(node)).modify(self._m.Node(state="DRAIN", reason=validate.reason(reason)))

    def resume(self, node: str) -> None:
        with self._rpc("Node.modify"):
            self._m.Node(validate.node_name(node)).modify(self._m.Node(state="RESUME"))

    def set_admin_comment(self, job_id: int, text: str) -> None:
        job_id, text = validate.job_id(job_id), validate.admin_comment(text)
        with self._rpc("Job.modify"):
            self._m.Job(job_id).modify(self._m.JobSubmitDescription(admin_comment=text))
