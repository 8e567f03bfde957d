"""The default ``SlurmClient``: Slurm's own commands, run as argv lists with timeouts.

Reads use ``--json`` where Slurm 22.05 has it (``squeue``, ``sinfo``,
``sacct``); ``scontrol`` has no ``--json`` on 22.05 (``unrecognized option``),
so single records come from ``scontrol -o show job`` (one line per record),
which, unlike ``squeue --json`` on 22.05, honours the job id filter. It takes
one id only, so several come from one ``scontrol -o show job`` of every job,
kept to those asked for. Building
the argv, running it and parsing the output are separate steps; the runner is
injected so unit tests check the argv without a cluster.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from festina_hpc.slurm import parse, validate
from festina_hpc.slurm.errors import SlurmCommandError, SlurmError
from festina_hpc.slurm.sbatch import render_script
from festina_hpc.slurm.types import FINISHED_JOB_STATES, ServingJobSpec, SlurmJob, SlurmNode

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
_T = TypeVar("_T")
_RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED", "COMPLETING"})


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, stdin: str | None, env: Mapping[str, str],
                 timeout_s: float) -> Completed: ...


def subprocess_runner(argv: Sequence[str], *, stdin: str | None, env: Mapping[str, str],
                      timeout_s: float) -> Completed:
    """Runs ``argv`` (never through a shell); timeouts and a missing binary become ``SlurmCommandError``."""
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, env=dict(env),
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SlurmCommandError(argv, f"timed out after {timeout_s:g} s") from exc
    except OSError as exc:
        raise SlurmCommandError(argv, f"cannot run: {exc.strerror or exc}") from exc
    return Completed(proc.returncode, proc.stdout, proc.stderr)


class CliSlurmClient:
    """``SlurmClient`` over sbatch/squeue/sinfo/scontrol/scancel/sacct.

    ``slurm_conf`` is passed to every command as ``SLURM_CONF`` (the dev cluster
    has no /etc/slurm); None leaves the caller's environment as it is.
    """

    def __init__(self, slurm_conf: Path | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 runner: Runner = subprocess_runner, bin_dir: Path | None = None,
                 sleep: Callable[[float], None] = time.sleep, poll_interval_s: float = 0.25) -> None:
        self._env = dict(os.environ)
        if slurm_conf is not None:
            self._env["SLURM_CONF"] = str(slurm_conf)
        self._timeout_s = timeout_s
        self._runner = runner
        self._bin_dir = bin_dir
        self._sleep = sleep
        self._poll_interval_s = poll_interval_s

    # -- running ---------------------------------------------------------------------------------------------
    def _argv(self, command: str, *args: str) -> list[str]:
        return [str(self._bin_dir / command) if self._bin_dir else command, *args]

    def _run(self, argv: Sequence[str], stdin: str | None = None, ok_codes: frozenset[int] = frozenset({0})
             ) -> Completed:
        done = self._runner(argv, stdin=stdin, env=self._env, timeout_s=self._timeout_s)
        if done.returncode not in ok_codes:
            raise SlurmCommandError(argv, f"exit code {done.returncode}", done.returncode, done.stderr)
        return done

    def _parse(self, argv: Sequence[str], parser: Callable[[str], _T], text: str) -> _T:
        try:
            return parser(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise SlurmCommandError(argv, f"unreadable output ({exc})") from exc

    # -- reads -----------------------------------------------------------------------------------------------
    def version(self) -> tuple[int, int]:
        argv = self._argv("scontrol", "--version")
        return self._parse(argv, parse.parse_version, self._run(argv).stdout)

    def list_jobs(self) -> tuple[SlurmJob, ...]:
        argv = self._argv("squeue", "--json")
        return self._parse(argv, parse.parse_squeue_json, self._run(argv).stdout)

    def list_nodes(self) -> tuple[SlurmNode, ...]:
        """Every node; MPS in use is summed from the running jobs (22.05's sinfo miscounts it)."""
        argv = self._argv("sinfo", "--json")
        nodes = self._parse(argv, parse.parse_sinfo_json, self._run(argv).stdout)
        if not any(g.name == "mps" for node in nodes for g in node.gres):
            return nodes
        return parse.with_mps_used_from_jobs(nodes, self.list_jobs())

    def get_job(self, job_id: int) -> SlurmJob | None:
        argv = self._argv("scontrol", "-o", "show", "job", str(validate.job_id(job_id)))
        done = self._run(argv, ok_codes=frozenset({0, 1}))
        if done.returncode == 1:
            if "Invalid job id" in done.stderr:
                return None
            raise SlurmCommandError(argv, "exit code 1", 1, done.stderr)
        records = self._parse(argv, parse.parse_oneliners, done.stdout)
        if not records:
            return None
        try:
            return parse.job_from_oneliner(records[0])
        except (ValueError, KeyError) as exc:
            raise SlurmCommandError(argv, f"unreadable output ({exc})") from exc

    def get_jobs(self, job_ids: Sequence[int]) -> dict[int, SlurmJob]:
        wanted = {validate.job_id(j) for j in job_ids}
        if not wanted:
            return {}
        argv = self._argv("scontrol", "-o", "show", "job")
        jobs = self._parse(argv, parse.parse_scontrol_jobs, self._run(argv).stdout)
        return {job.job_id: job for job in jobs if job.job_id in wanted}

    def job_history(self, job_ids: Sequence[int]) -> tuple[SlurmJob, ...]:
        """Finished and running jobs from accounting (``sacct --json``); needs slurmdbd, else SlurmCommandError."""
        ids = ",".join(str(validate.job_id(j)) for j in job_ids)
        argv = self._argv("sacct", "--json", "-j", ids)
        return self._parse(argv, parse.parse_sacct_json, self._run(argv).stdout)

    # -- writes ----------------------------------------------------------------------------------------------
    def submit(self, spec: ServingJobSpec) -> int:
        script = render_script(spec)
        argv = self._argv("sbatch", "--parsable")
        job_id = self._parse(argv, parse.parse_sbatch_parsable, self._run(argv, stdin=script).stdout)
        logger.info("submitted %s instance %s as job %d", spec.model, spec.instance_id, job_id)
        return job_id

    def cancel(self, job_id: int) -> None:
        # scancel exits 0 for an unknown job id as well, which is the idempotence we want.
        self._run(self._argv("scancel", str(validate.job_id(job_id))))

    def hold(self, job_id: int) -> None:
        self._run(self._argv("scontrol", "hold", str(validate.job_id(job_id))))

    def release(self, job_id: int) -> None:
        self._run(self._argv("scontrol", "release", str(validate.job_id(job_id))))

    def requeue(self, job_id: int, nodelist: Sequence[str], timeout_s: float = 30.0) -> None:
        job_id = validate.job_id(job_id)
        nodes = validate.node_names(nodelist, "nodelist")
        if not nodes:
            raise SlurmError(f"requeue of job {job_id} needs at least one node")
        job = self.get_job(job_id)
        if job is None:
            raise SlurmError(f"job {job_id} does not exist")
        if job.state in _RUNNING_STATES:
            # Slurm refuses NodeList= on a running job: stop it held, re-target while pending.
            self._run(self._argv("scontrol", "requeuehold", str(job_id)))
            self._wait_pending(job_id, timeout_s)
        elif job.state == "PENDING":
            if not job.held:
                self.hold(job_id)
        else:
            raise SlurmError(f"job {job_id} is {job.state}; only pending or running jobs can be requeued")
        # StartTime=now: a requeued job is otherwise not eligible for cred_expire+1 s.
        self._run(self._argv("scontrol", "update", f"JobId={job_id}", f"NodeList={','.join(nodes)}",
                             "StartTime=now"))
        self.release(job_id)

    def _wait_pending(self, job_id: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if job is None or job.state in FINISHED_JOB_STATES:
                raise SlurmError(f"job {job_id} ended while being requeued")
            if job.state == "PENDING":
                return
            if time.monotonic() >= deadline:
                raise SlurmError(f"job {job_id} still {job.state} {timeout_s:g} s after requeuehold")
            self._sleep(self._poll_interval_s)

    def drain(self, node: str, reason: str) -> None:
        self._run(self._argv("scontrol", "update", f"NodeName={validate.node_name(node)}", "State=DRAIN",
                             f"Reason={validate.reason(reason)}"))

    def resume(self, node: str) -> None:
        self._run(self._argv("scontrol", "update", f"NodeName={validate.node_name(node)}", "State=RESUME"))

    def set_admin_comment(self, job_id: int, text: str) -> None:
        self._run(self._argv("scontrol", "update", f"JobId={validate.job_id(job_id)}",
                             f"AdminComment={validate.admin_comment(text)}"))
