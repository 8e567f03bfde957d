"""The CLI backend's argv, error messages and requeue sequence, with a scripted runner instead of Slurm."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from festina_hpc.slurm.cli_backend import CliSlurmClient, Completed, subprocess_runner
from festina_hpc.slurm.errors import SlurmCommandError, SlurmError, SlurmInputError
from festina_hpc.slurm.types import ServingJobSpec
from tests.slurm.conftest import sample

JOB_LINE = ("JobId={id} JobName=j UserId=root(0) JobState={state} Reason={reason} Restarts=0 "
            "Partition=gpu ReqNodeList=(null) ExcNodeList=(null) NodeList={nodes} TresPerNode=gres:mps:10")


@dataclass
class ScriptedRunner:
    """Answers each argv (joined by spaces) with the next queued Completed for its prefix."""

    answers: dict[str, list[Completed]] = field(default_factory=dict)
    calls: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def on(self, prefix: str, *answers: Completed) -> ScriptedRunner:
        self.answers.setdefault(prefix, []).extend(answers)
        return self

    def __call__(self, argv: Sequence[str], *, stdin: str | None, env: Mapping[str, str],
                 timeout_s: float) -> Completed:
        line = " ".join(argv)
        self.calls.append((line, stdin, env.get("SLURM_CONF")))
        for prefix, queue in self.answers.items():
            if line.startswith(prefix) and queue:
                return queue.pop(0) if len(queue) > 1 else queue[0]
        return Completed(0, "", "")


def ok(stdout: str = "") -> Completed:
    return Completed(0, stdout, "")


def job_line(state: str, reason: str = "None", nodes: str = "n1", job_id: int = 7) -> Completed:
    return ok(JOB_LINE.format(id=job_id, state=state, reason=reason, nodes=nodes or "(null)") + "\n")


def make(runner: ScriptedRunner) -> CliSlurmClient:
    return CliSlurmClient(None, runner=runner, sleep=lambda _s: None)


def commands(runner: ScriptedRunner) -> list[str]:
    return [c[0] for c in runner.calls]


def test_submit_sends_the_script_on_stdin_with_slurm_conf() -> None:
    from pathlib import Path
    runner = ScriptedRunner().on("sbatch", ok("42\n"))
    client = CliSlurmClient(Path("/srv/x/etc/slurm.conf"), runner=runner)
    spec = ServingJobSpec(model="m", instance_id="i", command=("sleep", "1"), output_path="/tmp/%j", mps_pct=10)
    assert client.submit(spec) == 42
    line, stdin, conf = runner.calls[0]
    assert line == "sbatch --parsable" and stdin is not None and "#SBATCH --gres=mps:10" in stdin
    assert conf == "/srv/x/etc/slurm.conf"


@pytest.mark.parametrize(("call", "argv"), [
    (lambda c: c.cancel(7), "scancel 7"),
    (lambda c: c.hold("7"), "scontrol hold 7"),
    (lambda c: c.release(7), "scontrol release 7"),
    (lambda c: c.drain("n2", "GPU 0 lost"), "scontrol update NodeName=n2 State=DRAIN Reason=GPU 0 lost"),
    (lambda c: c.resume("n2"), "scontrol update NodeName=n2 State=RESUME"),
    (lambda c: c.list_jobs(), "squeue --json"),
    (lambda c: c.job_history([3, 4]), "sacct --json -j 3,4"),
])
def test_argv(call, argv: str) -> None:  # type: ignore[no-untyped-def]
    runner = ScriptedRunner().on("squeue", ok('{"jobs": []}')).on("sacct", ok('{"jobs": []}'))
    call(make(runner))
    assert commands(runner) == [argv]


def test_drain_reason_is_one_argv_element() -> None:
    seen: list[Sequence[str]] = []

    def capture(argv: Sequence[str], **kwargs: object) -> Completed:
        seen.append(list(argv))
        return ok()

    CliSlurmClient(runner=capture).drain("n1", "two words")  # type: ignore[arg-type]
    assert seen == [["scontrol", "update", "NodeName=n1", "State=DRAIN", "Reason=two words"]]


def test_invalid_input_runs_nothing() -> None:
    runner = ScriptedRunner()
    with pytest.raises(SlurmInputError):
        make(runner).drain("n1 State=DOWN", "x")
    with pytest.raises(SlurmInputError):
        make(runner).cancel(0)
    assert runner.calls == []


def test_failure_is_one_line_with_command_exit_code_and_stderr() -> None:
    runner = ScriptedRunner().on("scontrol", Completed(1, "", "scontrol: error: Invalid node name\nspecified\n"))
    with pytest.raises(SlurmCommandError) as info:
        make(runner).resume("n9")
    assert str(info.value) == ("scontrol update NodeName=n9 State=RESUME: exit code 1: "
                               "scontrol: error: Invalid node name specified")
    assert info.value.returncode == 1


def test_unreadable_output_is_a_command_error() -> None:
    runner = ScriptedRunner().on("sinfo", ok("Slurm is not happy"))
    with pytest.raises(SlurmCommandError, match=r"^sinfo --json: unreadable output"):
        make(runner).list_nodes()


def test_list_nodes_sums_mps_from_jobs() -> None:
    runner = ScriptedRunner().on("sinfo", ok(sample("devcluster_sinfo.json"))) \
        .on("squeue", ok(sample("devcluster_squeue.json")))
    nodes = {n.name: n for n in make(runner).list_nodes()}
    assert nodes["n1"].mps_used == 55 and commands(runner) == ["sinfo --json", "squeue --json"]


def test_get_job_of_unknown_id_is_none() -> None:
    runner = ScriptedRunner().on("scontrol -o show job", Completed(1, "", "slurm_load_jobs error: Invalid job id "
                                                                          "specified\n"))
    assert make(runner).get_job(99) is None


def test_requeue_of_a_running_job_holds_waits_retargets_releases() -> None:
    runner = ScriptedRunner().on("scontrol -o show job 7", job_line("RUNNING"), job_line("COMPLETING"),
                                 job_line("PENDING", "JobHeldAdmin", ""))
    make(runner).requeue(7, ["n2", "n3"])
    assert commands(runner) == [
        "scontrol -o show job 7", "scontrol requeuehold 7", "scontrol -o show job 7", "scontrol -o show job 7",
        "scontrol update JobId=7 NodeList=n2,n3 StartTime=now", "scontrol release 7"]


def test_requeue_of_a_pending_job_holds_it_first() -> None:
    runner = ScriptedRunner().on("scontrol -o show job 7", job_line("PENDING", "Priority", ""))
    make(runner).requeue(7, ["n2"])
    assert commands(runner) == ["scontrol -o show job 7", "scontrol hold 7",
                                "scontrol update JobId=7 NodeList=n2 StartTime=now", "scontrol release 7"]


@pytest.mark.parametrize(("answer", "message"), [
    (job_line("COMPLETED"), "job 7 is COMPLETED; only pending or running jobs can be requeued"),
    (Completed(1, "", "Invalid job id specified"), "job 7 does not exist"),
])
def test_requeue_refuses_finished_or_unknown_jobs(answer: Completed, message: str) -> None:
    runner = ScriptedRunner().on("scontrol -o show job 7", answer)
    with pytest.raises(SlurmError, match=message):
        make(runner).requeue(7, ["n2"])


def test_requeue_gives_up_when_the_job_never_becomes_pending() -> None:
    runner = ScriptedRunner().on("scontrol -o show job 7", job_line("RUNNING"))
    with pytest.raises(SlurmError, match="still RUNNING 0 s after requeuehold"):
        make(runner).requeue(7, ["n2"], timeout_s=0)


def test_subprocess_runner_reports_missing_binary_and_timeout() -> None:
    with pytest.raises(SlurmCommandError, match="^no-such-slurm-binary: cannot run"):
        subprocess_runner(["no-such-slurm-binary"], stdin=None, env={}, timeout_s=1)
    with pytest.raises(SlurmCommandError, match=r"^sleep 5: timed out after 0.1 s"):
        subprocess_runner(["sleep", "5"], stdin=None, env={"PATH": "/usr/bin:/bin"}, timeout_s=0.1)


def test_set_admin_comment_is_one_scontrol_update_argv() -> None:
    runner = ScriptedRunner()
    make(runner).set_admin_comment(7, "festina_energy_j=9000,festina_energy_kwh=0.003")
    assert commands(runner) == ["scontrol update JobId=7 AdminComment=festina_energy_j=9000,festina_energy_kwh=0.003"]


@pytest.mark.parametrize(("job_id", "text", "message"), [
    (7, "a b", "admin comment 'a b' may only hold"),
    (7, "x=1 JobId=8", "admin comment 'x=1 JobId=8' may only hold"),
    (7, "x\ny", "admin comment 'x\\ny' may only hold"),
    (7, "x" * 1025, "is longer than 1024 characters"),
    ("7 Partition=x", "x=1", "job id '7 Partition=x' is not a positive integer"),
])
def test_set_admin_comment_refuses_bad_input_before_running_anything(job_id: object, text: str,
                                                                    message: str) -> None:
    runner = ScriptedRunner()
    with pytest.raises(SlurmInputError, match=re.escape(message)):
        make(runner).set_admin_comment(job_id, text)  # type: ignore[arg-type]
    assert runner.calls == []


def test_set_admin_comment_on_a_finished_job_is_a_command_error_with_slurms_words() -> None:
    runner = ScriptedRunner().on("scontrol update", Completed(1, "", "Job has already finished for job 7\n"))
    with pytest.raises(SlurmCommandError) as info:
        make(runner).set_admin_comment(7, "festina_energy_j=1")
    assert "Job has already finished" in info.value.stderr and "\n" not in str(info.value)


def test_get_jobs_is_one_scontrol_for_every_id_asked() -> None:
    runner = ScriptedRunner().on("scontrol -o show job", ok(sample("devcluster_scontrol_job.txt")))
    jobs = make(runner).get_jobs([5, 2, 99])
    assert commands(runner) == ["scontrol -o show job"]
    assert {i: j.state for i, j in jobs.items()} == {2: "RUNNING", 5: "PENDING"}  # 99: Slurm no longer knows it


def test_get_jobs_of_no_ids_runs_nothing_and_bad_ids_nothing_either() -> None:
    runner = ScriptedRunner()
    assert make(runner).get_jobs([]) == {}
    with pytest.raises(SlurmInputError):
        make(runner).get_jobs([7, -1])
    assert commands(runner) == []


def test_get_jobs_on_an_empty_cluster_and_unreadable_output() -> None:
    runner = ScriptedRunner().on("scontrol -o show job", ok("No jobs in the system\n"), ok("garbage\n"))
    assert make(runner).get_jobs([7]) == {}
    with pytest.raises(SlurmCommandError, match=r"^scontrol -o show job: unreadable output"):
        make(runner).get_jobs([7])
