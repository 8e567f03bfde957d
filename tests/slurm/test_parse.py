"""Parsers on output captured from real Slurm 22.05 clusters (the notes' and our dev cluster's), plus the newer
JSON shape."""

from __future__ import annotations

import json
import time

import pytest

from festina_hpc.slurm import parse
from festina_hpc.slurm.types import Gres, PowerState
from tests.slurm.conftest import sample


@pytest.mark.parametrize(("expr", "expected"), [
    ("n1", ("n1",)),
    ("n[1-3]", ("n1", "n2", "n3")),
    ("n[1,3-4],gpu07", ("n1", "n3", "n4", "gpu07")),
    ("n[01-02]", ("n01", "n02")),
    ("rack[1-2]-n[1-2]", ("rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2")),
    ("", ()),
    ("(null)", ()),
])
def test_expand_hostlist(expr: str, expected: tuple[str, ...]) -> None:
    assert parse.expand_hostlist(expr) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("gpu:h100:4,mps:h100:400", (Gres("gpu", "h100", 4), Gres("mps", "h100", 400))),
    ("gpu:h100:2(IDX:0-1),mps:h100:0(IDX:N/A)", (Gres("gpu", "h100", 2), Gres("mps", "h100", 0))),
    ("gpu:h100:2(IDX:0,2)", (Gres("gpu", "h100", 2),)),
    ("gpu:4(S:0)", (Gres("gpu", None, 4),)),
    ("(null)", ()),
    ("", ()),
])
def test_parse_gres(text: str, expected: tuple[Gres, ...]) -> None:
    assert parse.parse_gres(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("gres:mps:50", (Gres("mps", None, 50),)),
    ("gres:gpu:h100:2", (Gres("gpu", "h100", 2),)),
    ("gres/gpu:h100=2", (Gres("gpu", "h100", 2),)),
    ("gres/mps=25,cpu=2", (Gres("mps", None, 25),)),
    ("", ()),
])
def test_parse_tres_per_node(text: str, expected: tuple[Gres, ...]) -> None:
    assert parse.parse_tres_per_node(text) == expected


def test_sinfo_states_sample_reads_drain_and_power_saving() -> None:
    nodes = {n.name: n for n in parse.parse_sinfo_json(sample("sinfo_states.json"))}
    assert list(nodes) == ["n1", "n2", "n3", "n4"]
    assert (nodes["n1"].state, nodes["n1"].gpus_used, nodes["n1"].gpus_total) == ("mixed", 2, 4)
    assert nodes["n3"].drained and nodes["n3"].reason == "sample drain"
    assert nodes["n4"].power_state is PowerState.OFF and not nodes["n4"].drained
    assert nodes["n2"].power_state is PowerState.ON and nodes["n2"].mps_total == 400
    assert nodes["n2"].partitions == ("gpu",)


def test_devcluster_sinfo_sample() -> None:
    nodes = {n.name: n for n in parse.parse_sinfo_json(sample("devcluster_sinfo.json"))}
    assert nodes["n2"].gpus_used == 2 and nodes["n3"].reason == "festina test drain"
    assert nodes["n4"].power_state is PowerState.POWERING_DOWN
    assert nodes["n1"].address == "127.0.0.1"  # where festinad reaches a serving job on it


def test_squeue_sample_reads_every_job() -> None:
    jobs = {j.job_id: j for j in parse.parse_squeue_json(sample("squeue.json"))}
    assert len(jobs) == 10
    assert jobs[3].gres == (Gres("mps", None, 50),) and jobs[2].gres == (Gres("gpu", "h100", 2),)
    assert jobs[8].comment == "c-21624" and jobs[8].required_nodes == ("n1",)
    rq = jobs[10]
    assert (rq.state, rq.nodes, rq.excluded_nodes, rq.restart_count) == ("RUNNING", ("n2",), ("n1",), 1)
    assert rq.user == "root" and rq.partition == "gpu" and rq.submit_time_s and rq.submit_time_s > 1.7e9


def test_devcluster_squeue_sample_has_gres_detail_and_held_job() -> None:
    jobs = {j.name: j for j in parse.parse_squeue_json(sample("devcluster_squeue.json"))}
    assert jobs["mps25"].gres_detail == ("mps:25(IDX:0)",) and jobs["mps25"].nodes == ("n1",)
    assert jobs["gpu2"].gres_detail == ("gpu:h100:2(IDX:0-1)",)
    assert jobs["held"].held and jobs["held"].excluded_nodes == ("n1",)


@pytest.mark.parametrize(("detail", "expected"), [
    ("mps:25(IDX:0)", {"mps": (0,)}),
    ("mps:40(IDX:1)", {"mps": (1,)}),
    ("gpu:h100:2(IDX:0-1)", {"gpu": (0, 1)}),
    ("gpu:h100:2(IDX:0,2)", {"gpu": (0, 2)}),
    ("gpu:h100:3(IDX:0-1,3)", {"gpu": (0, 1, 3)}),
    ("gpu:1(IDX:N/A)", {"gpu": ()}),
    ("gpu:h100:1(IDX:0),mps:0(IDX:N/A)", {"gpu": (0,), "mps": ()}),
    ("", {}),
    ("(null)", {}),
])
def test_gres_indices(detail: str, expected: dict[str, tuple[int, ...]]) -> None:
    assert parse.gres_indices(detail) == expected


def test_devcluster_mps_jobs_share_one_gpu_by_their_gres_detail() -> None:
    # Two MPS jobs on n1 (25% and 30%): Slurm put both on GPU 0, the other GPU stays empty.
    jobs = {j.name: j for j in parse.parse_squeue_json(sample("devcluster_squeue.json"))}
    assert [parse.gres_indices(jobs[n].gres_detail[0]) for n in ("mps25", "mps30", "gpu2")] == \
        [{"mps": (0,)}, {"mps": (0,)}, {"gpu": (0, 1)}]
    line = ("JobId=2 JobName=mps25 JobState=RUNNING NodeList=n1 TresPerNode=gres:mps:25 "
            "Nodes=n1 CPU_IDs=0 Mem=1000 GRES=mps:25(IDX:0)")
    assert parse.job_from_oneliner(parse.parse_oneliner(line)).gres_detail == ("mps:25(IDX:0)",)


def test_devcluster_one_mps_gpu_per_node_sample() -> None:
    # mps:30, gpu:1, mps:30, mps:50 on one node of two GPUs, submitted with --account=probeacct
    jobs = parse.parse_squeue_json(sample("devcluster_squeue_mps_one_gpu.json"))
    assert [(j.state, j.gres_detail) for j in jobs] == [
        ("RUNNING", ("mps:30(IDX:0)",)), ("RUNNING", ("gpu:h100:1(IDX:1)",)), ("RUNNING", ("mps:30(IDX:0)",)),
        ("PENDING", ())]
    assert {j.account for j in jobs} == {"probeacct"} and jobs[3].reason == "Resources"


def test_mps_used_is_summed_from_jobs_not_taken_from_sinfo() -> None:
    nodes = parse.parse_sinfo_json(sample("devcluster_sinfo.json"))
    jobs = parse.parse_squeue_json(sample("devcluster_squeue.json"))
    assert next(n for n in nodes if n.name == "n1").mps_used == 1  # 22.05's count: GPUs with MPS in use
    fixed = {n.name: n for n in parse.with_mps_used_from_jobs(nodes, jobs)}
    assert (fixed["n1"].mps_used, fixed["n1"].gpus_used, fixed["n2"].mps_used, fixed["n2"].gpus_used) == (55, 0, 0, 2)


def test_newer_json_shape() -> None:
    """Slurm 24.x: numbers wrapped, states as lists, a node listed once per partition."""
    job = {"job_id": 7, "name": "x", "job_state": ["PENDING"], "state_reason": "JobHeldUser",
           "nodes": "", "tres_per_node": "gres/mps=25", "submit_time": {"set": True, "infinite": False,
                                                                          "number": 1795826283},
           "start_time": {"set": False, "infinite": False, "number": 0}, "restart_cnt": 2}
    [parsed] = parse.parse_squeue_json(json.dumps({"jobs": [job]}))
    assert (parsed.state, parsed.gres, parsed.submit_time_s, parsed.start_time_s, parsed.restart_count) == \
        ("PENDING", (Gres("mps", None, 25),), 1795826283, None, 2)
    node = {"name": "n1", "state": ["IDLE", "DRAIN", "POWERED_DOWN"], "cpus": 8, "gres": "gpu:h100:2",
            "gres_used": "gpu:h100:0(IDX:N/A)", "partitions": ["gpu"], "reason": "r"}
    nodes = parse.parse_sinfo_json(json.dumps({"nodes": [node, {**node, "partitions": ["other"]}]}))
    assert len(nodes) == 1 and nodes[0].state == "idle" and nodes[0].flags == ("DRAIN", "POWERED_DOWN")
    assert nodes[0].power_state is PowerState.OFF and nodes[0].drained


def test_scontrol_oneliner_job_sample() -> None:
    records = parse.parse_oneliners(sample("scontrol_show_job_oneliner.txt"))
    jobs = {int(r["JobId"]): parse.job_from_oneliner(r) for r in records}
    running = jobs[7]
    assert (running.state, running.nodes, running.comment, running.gres, running.user) == \
        ("RUNNING", ("n1",), "sample", (Gres("gpu", None, 2),), "root")
    assert jobs[6].reason == "JobHeldUser" and jobs[6].nodes == ()
    assert records[0]["AllocNode:Sid"] == "localhost:2368" and records[0]["Power"] == ""


def test_scontrol_oneliner_node_sample_keeps_values_with_spaces() -> None:
    records = parse.parse_oneliners(sample("scontrol_show_node_oneliner.txt"))
    nodes = {r["NodeName"]: parse.node_from_oneliner(r) for r in records}
    assert nodes["n3"].drained and nodes["n3"].reason.startswith("sample drain [root@")
    assert records[0]["OS"].startswith("Linux 6.18") and nodes["n1"].state == "mixed"
    assert nodes["n1"].gpus_total == 4 and nodes["n1"].cpus == 8
    assert nodes["n1"].address == records[0].get("NodeAddr", "")


def test_devcluster_scontrol_samples() -> None:
    jobs = [parse.job_from_oneliner(r) for r in parse.parse_oneliners(sample("devcluster_scontrol_job.txt"))]
    assert {j.name: j.gres for j in jobs}["mps30"] == (Gres("mps", None, 30),)
    nodes = [parse.node_from_oneliner(r) for r in parse.parse_oneliners(sample("devcluster_scontrol_node.txt"))]
    assert {n.name: n.gpus_used for n in nodes}["n2"] == 2


def test_sacct_sample() -> None:
    jobs = parse.parse_sacct_json(sample("sacct.json"))
    assert jobs and all(j.job_id > 0 for j in jobs)
    assert {j.state for j in jobs} >= {"COMPLETED"}


@pytest.mark.parametrize(("text", "expected"), [("42\n", 42), ("42;slt\n", 42)])
def test_sbatch_parsable(text: str, expected: int) -> None:
    assert parse.parse_sbatch_parsable(text) == expected


def test_bad_outputs_raise_value_error() -> None:
    for call in (lambda: parse.parse_sbatch_parsable("Submitted batch job"), lambda: parse.parse_squeue_json("[]"),
                 lambda: parse.parse_sinfo_json("not json"), lambda: parse.parse_version("slurm")):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize(("text", "expected"), [("slurm 22.05.8\n", (22, 5)), ("25.11.2", (25, 11))])
def test_parse_version(text: str, expected: tuple[int, int]) -> None:
    assert parse.parse_version(text) == expected


def test_devcluster_ended_jobs_have_end_time_and_exit_code() -> None:
    """Captured on the dev cluster (22.05): ``exit 3`` (FAILED), a scancelled ``sleep`` (CANCELLED) and a
    script killed by SIGKILL (FAILED); squeue's ``exit_code`` is the raw wait status (768, 0, 9)."""
    jobs = {j.job_id: j for j in parse.parse_squeue_json(sample("devcluster_squeue_ended.json"))}
    ended = {i: (j.state, j.exit_code, j.exit_signal, j.end_time_s) for i, j in jobs.items()}
    assert ended == {1: ("FAILED", 3, 0, 1796686295), 2: ("CANCELLED", 0, 0, 1796686294),
                     3: ("FAILED", 0, 9, 1796686295)}
    assert all(j.start_time_s is not None and j.start_time_s <= (j.end_time_s or 0) for j in jobs.values())


def test_devcluster_scontrol_ended_jobs_agree_with_squeue(monkeypatch: pytest.MonkeyPatch) -> None:
    """scontrol's ``ExitCode=3:0`` and ``EndTime`` (local time; the capture's host ran on UTC) say the same."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        oneliners = [parse.job_from_oneliner(r)
                     for r in parse.parse_oneliners(sample("devcluster_scontrol_ended.txt"))]
    finally:
        monkeypatch.undo()
        time.tzset()
    from_scontrol = {j.job_id: (j.state, j.exit_code, j.exit_signal, j.end_time_s) for j in oneliners}
    from_squeue = {j.job_id: (j.state, j.exit_code, j.exit_signal, j.end_time_s)
                   for j in parse.parse_squeue_json(sample("devcluster_squeue_ended.json"))}
    assert from_scontrol == from_squeue


def test_notes_samples_completed_jobs_exit_zero() -> None:
    """The notes' captures (22.05): COMPLETED jobs, ``exit_code`` 0 and ``ExitCode=0:0``, an end time each."""
    for job in parse.parse_squeue_json(sample("squeue.json")):
        if job.state == "COMPLETED":
            assert (job.exit_code, job.exit_signal) == (0, 0) and job.end_time_s
    records = parse.parse_oneliners(sample("scontrol_show_job_oneliner.txt"))
    done = [parse.job_from_oneliner(r) for r in records if r["JobState"] == "COMPLETED"]
    assert done and all((j.exit_code, j.exit_signal) == (0, 0) and j.end_time_s for j in done)


def test_running_job_has_no_end_time_or_exit_code() -> None:
    """A running job's EndTime is its time limit's end and its exit code 0: neither is read."""
    jobs = parse.parse_squeue_json(sample("devcluster_squeue.json"))
    running = [j for j in jobs if j.state == "RUNNING"]
    assert running and all((j.end_time_s, j.exit_code, j.exit_signal) == (None, None, None) for j in running)
    records = parse.parse_oneliners(sample("scontrol_show_job_oneliner.txt"))
    live = [parse.job_from_oneliner(r) for r in records if r["JobState"] in ("RUNNING", "PENDING")]
    assert live and all(j.end_time_s is None and j.exit_code is None for j in live)


def test_newer_json_shape_exit_code_and_end_time() -> None:
    """Slurm 24.x-25.11 (data parser v0.0.40+; shape from its OpenAPI schema, no capture of ours): ``exit_code``
    is an object, ``end_time`` wrapped."""
    def job(state: str, exit_code: object) -> dict[str, object]:
        return {"job_id": 9, "job_state": [state], "end_time": {"set": True, "infinite": False, "number": 1796686295},
                "exit_code": exit_code}

    unset = {"set": False, "infinite": False, "number": 0}
    exited = {"status": ["EXITED"], "return_code": {"set": True, "infinite": False, "number": 3},
              "signal": {"id": unset, "name": ""}}
    signaled = {"status": ["SIGNALED"], "return_code": unset,
                "signal": {"id": {"set": True, "infinite": False, "number": 9}, "name": "KILL"}}
    success = {"status": ["SUCCESS"], "return_code": {"set": True, "infinite": False, "number": 0},
               "signal": {"id": unset, "name": ""}}
    got = [parse.parse_squeue_json(json.dumps({"jobs": [job(state, code)]}))[0]
           for state, code in (("FAILED", exited), ("FAILED", signaled), ("COMPLETED", success),
                               ("RUNNING", success))]
    assert [(j.exit_code, j.exit_signal, j.end_time_s) for j in got] == [
        (3, 0, 1796686295), (0, 9, 1796686295), (0, 0, 1796686295), (None, None, None)]


@pytest.mark.parametrize(("text", "expected"), [("3:0", (3, 0)), ("0:9", (0, 9)), ("0:0", (0, 0)), ("", None),
                                                ("x:1", None), ("3", None)])
def test_parse_exit_code(text: str, expected: tuple[int, int] | None) -> None:
    assert parse.parse_exit_code(text) == expected


@pytest.mark.parametrize(("value", "expected"), [(768, (3, 0)), (9, (0, 9)), (0, (0, 0)), (None, None),
                                                 ({"set": False, "infinite": False, "number": 0}, None)])
def test_exit_status(value: object, expected: tuple[int, int] | None) -> None:
    assert parse.exit_status(value) == expected


def test_scontrol_jobs_reads_every_job_of_a_captured_listing() -> None:
    """``scontrol -o show job`` with no id (what ``get_jobs`` runs): every job, each in its own state."""
    jobs = {j.job_id: j for j in parse.parse_scontrol_jobs(sample("devcluster_scontrol_job.txt"))}
    assert {i: j.state for i, j in jobs.items()} == \
        {1: "COMPLETED", 2: "RUNNING", 3: "RUNNING", 4: "RUNNING", 5: "PENDING"}
    assert jobs[3].gres == (Gres("mps", None, 30),)
    assert len(parse.parse_scontrol_jobs(sample("scontrol_show_job_oneliner.txt"))) == 7


def test_scontrol_jobs_of_an_empty_cluster_is_none() -> None:
    assert parse.parse_scontrol_jobs("No jobs in the system\n") == ()
    with pytest.raises(KeyError):
        parse.parse_scontrol_jobs("Slurm is not happy\n")
