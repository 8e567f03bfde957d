"""The Slurm client against a real local cluster (the ``slurm_cluster`` fixture): submit, list, hold, requeue,
drain, cancel, and power saving. Jobs are pinned to the nodes power saving leaves on, so none waits for a boot.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from festina_hpc.devcluster import DevClusterConfig
from festina_hpc.slurm.cli_backend import CliSlurmClient
from festina_hpc.slurm.errors import SlurmCommandError
from festina_hpc.slurm.types import Gres, PowerState, ServingJobSpec, SlurmJob, SlurmNode
from tests.slurm.conftest import wait_for

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def client(slurm_cluster: DevClusterConfig) -> CliSlurmClient:
    return CliSlurmClient(slurm_cluster.slurm_conf, timeout_s=20.0)


@pytest.fixture(scope="module")
def on_nodes(slurm_cluster: DevClusterConfig) -> tuple[str, ...]:
    """Nodes power saving never powers down."""
    nodes = tuple(n for n in slurm_cluster.node_names if n not in slurm_cluster.power_save_node_names)
    if len(nodes) < 3:
        pytest.skip(f"the cluster in {slurm_cluster.base_dir} keeps only {len(nodes)} nodes on; these tests need 3")
    return nodes


@pytest.fixture
def jobs(client: CliSlurmClient) -> Iterator[list[int]]:
    """Job ids a test submitted; all cancelled afterwards."""
    submitted: list[int] = []
    yield submitted
    for job_id in submitted:
        client.cancel(job_id)


def serving_job(cluster: DevClusterConfig, instance: str, **fields: object) -> ServingJobSpec:
    defaults: dict[str, object] = {"model": "llama-3.1-8b", "instance_id": instance, "command": ("sleep", "300"),
                                   "output_path": str(cluster.base_dir / "out" / "%j.out")}
    return ServingJobSpec(**{**defaults, **fields})  # type: ignore[arg-type]


def job_in(client: CliSlurmClient, job_id: int, state: str) -> SlurmJob | None:
    job = next((j for j in client.list_jobs() if j.job_id == job_id), None)
    return job if job is not None and job.state == state else None


def node(client: CliSlurmClient, name: str) -> SlurmNode:
    return next(n for n in client.list_nodes() if n.name == name)


def test_submitted_serving_job_runs_with_its_gres(client: CliSlurmClient, slurm_cluster: DevClusterConfig,
                                                  on_nodes: tuple[str, ...], jobs: list[int]) -> None:
    first = client.submit(serving_job(slurm_cluster, "a", mps_pct=25, nodelist=(on_nodes[0],)))
    second = client.submit(serving_job(slurm_cluster, "b", mps_pct=30, nodelist=(on_nodes[0],)))
    whole = client.submit(serving_job(slurm_cluster, "c", gpus=2, gpu_type="h100", nodelist=(on_nodes[1],)))
    jobs += [first, second, whole]
    job = wait_for(lambda: job_in(client, first, "RUNNING"), 15, f"job {first} running")
    assert job.nodes == (on_nodes[0],) and job.gres == (Gres("mps", None, 25),)
    assert job.name == "festina-llama-3.1-8b-a" and job.comment == "festina:model=llama-3.1-8b,instance=a"
    assert job.user == "root" and job.partition == slurm_cluster.partition
    assert wait_for(lambda: job_in(client, second, "RUNNING"), 15, f"job {second} running")
    full = wait_for(lambda: job_in(client, whole, "RUNNING"), 15, f"job {whole} running")
    assert full.gres == (Gres("gpu", "h100", 2),) and full.gres_detail == ("gpu:h100:2(IDX:0-1)",)
    shared, busy = node(client, on_nodes[0]), node(client, on_nodes[1])
    assert (shared.mps_used, shared.mps_total, shared.gpus_used) == (55, 200, 0)
    assert (busy.gpus_used, busy.gpus_total, busy.mps_used) == (2, 2, 0)
    assert client.get_job(first) is not None and client.get_job(first).gres == (Gres("mps", None, 25),)  # type: ignore[union-attr]
    # The job watcher's one call for many ids: the same records, an id Slurm does not know left out.
    many = client.get_jobs([first, whole, 999999])
    assert set(many) == {first, whole} and many[first].gres == (Gres("mps", None, 25),)
    assert many[whole].state == "RUNNING"
    # festina-node writes the run's line once it has validated the job: it may come after the job runs.
    log = slurm_cluster.slurm_conf.parent / "festina-hooks.log"
    run_line = f"prolog job={first} node={on_nodes[0]} gpus=0 mps=25"
    assert wait_for(lambda: run_line in log.read_text() or None, 20, f"hook log line {run_line!r}")


def test_requeue_moves_a_running_job_to_another_node(client: CliSlurmClient, slurm_cluster: DevClusterConfig,
                                                     on_nodes: tuple[str, ...], jobs: list[int]) -> None:
    job_id = client.submit(serving_job(slurm_cluster, "r", mps_pct=10, nodelist=(on_nodes[0],)))
    jobs.append(job_id)
    wait_for(lambda: job_in(client, job_id, "RUNNING"), 15, f"job {job_id} running")
    client.requeue(job_id, [on_nodes[2]])
    moved = wait_for(lambda: job_in(client, job_id, "RUNNING"), 15, f"job {job_id} running again")
    assert moved.nodes == (on_nodes[2],) and moved.restart_count == 1 and moved.required_nodes == (on_nodes[2],)


def test_hold_then_requeue_of_a_pending_job_then_release(client: CliSlurmClient, slurm_cluster: DevClusterConfig,
                                                         on_nodes: tuple[str, ...], jobs: list[int]) -> None:
    job_id = client.submit(serving_job(slurm_cluster, "h", mps_pct=10, nodelist=(on_nodes[0],), hold=True))
    jobs.append(job_id)
    held = client.get_job(job_id)
    assert held is not None and held.held and held.state == "PENDING"
    client.requeue(job_id, [on_nodes[1]])  # pending: held, re-targeted, released
    moved = wait_for(lambda: job_in(client, job_id, "RUNNING"), 15, f"job {job_id} running")
    assert moved.nodes == (on_nodes[1],)


def test_drain_and_resume_a_node(client: CliSlurmClient, on_nodes: tuple[str, ...]) -> None:
    name = on_nodes[2]
    client.drain(name, "festina test: drain with a reason")
    try:
        drained = node(client, name)
        assert drained.drained and drained.reason == "festina test: drain with a reason"
    finally:
        client.resume(name)
    assert not node(client, name).drained


def test_cancel_ends_the_job_and_is_idempotent(client: CliSlurmClient, slurm_cluster: DevClusterConfig,
                                               on_nodes: tuple[str, ...]) -> None:
    job_id = client.submit(serving_job(slurm_cluster, "x", mps_pct=5, nodelist=(on_nodes[1],)))
    client.cancel(job_id)
    wait_for(lambda: job_in(client, job_id, "CANCELLED"), 15, f"job {job_id} cancelled")
    client.cancel(job_id)


def test_errors_name_the_command_and_unknown_jobs_are_none(client: CliSlurmClient) -> None:
    assert client.get_job(999999) is None
    assert client.get_jobs([999999]) == {}
    with pytest.raises(SlurmCommandError, match=r"^scontrol update NodeName=nosuchnode State=RESUME: exit code 1: ") \
            as info:
        client.resume("nosuchnode")
    assert "\n" not in str(info.value)


def test_power_saving_powers_down_an_idle_node_and_a_job_powers_it_up(
        client: CliSlurmClient, slurm_cluster: DevClusterConfig, jobs: list[int]) -> None:
    if not slurm_cluster.power_save_node_names:
        pytest.skip(f"power saving may power down no node of the cluster in {slurm_cluster.base_dir}")
    name = slurm_cluster.power_save_node_names[-1]
    power_file = slurm_cluster.base_dir / "power" / name
    timeout_s = slurm_cluster.suspend_time_s + slurm_cluster.suspend_timeout_s + 10
    off = wait_for(lambda: (n := node(client, name)).power_state is PowerState.OFF and n, timeout_s,
                   f"{name} powered down")
    assert off.state == "idle" and "POWERED_DOWN" in off.flags
    assert power_file.read_text().strip() == "off"
    job_id = client.submit(serving_job(slurm_cluster, "p", mps_pct=10, nodelist=(name,)))
    jobs.append(job_id)
    wait_for(lambda: power_file.read_text().strip() == "on", 15, f"ResumeProgram for {name}")
    wait_for(lambda: node(client, name).power_state is not PowerState.OFF, 15, f"{name} leaving POWERED_DOWN")
    assert f"{name} on" in Path(slurm_cluster.base_dir / "log" / "power.log").read_text()
