"""NodeAgent on persistent simulated GPUs and MPS: hooks, attribution, crash recovery, rate limits, safe points."""

from __future__ import annotations

import os
import signal

import pytest

from festina_hpc.node.agent import NodeAgent
from festina_hpc.node.errors import NodeInputError
from tests.node.conftest import SimNode, make_job


def test_two_jobs_on_one_gpu_share_it_and_the_sum_of_their_energy_is_the_counter_delta(sim_node: SimNode) -> None:
    n = sim_node
    start_j = n.gpu.energy_j(0)
    n.agent.prolog(make_job(11, mps_pct=40, clock_mhz=1410))
    n.clock.advance(5.0)
    n.agent.prolog(make_job(12, mps_pct=50, clock_mhz=1410))
    state = n.state.read().gpu(0)
    assert sum(j.sm_pct for j in state.jobs) == 90.0
    assert state.clock_mhz == n.gpu.current_clock_mhz(0) == 1410
    assert n.mps.running(0, n.paths.mps_pipe_dir(0)) and state.mps
    assert [w.sm_pct for w in n.gpu.workloads(0)] == [40.0, 50.0]
    n.clock.advance(10.0)
    n.agent.control_tick()
    n.clock.advance(10.0)
    first = n.agent.epilog(make_job(11, mps_pct=40))
    assert n.gpu.current_clock_mhz(0) == 1410  # job 12 still runs at the chosen clock
    n.clock.advance(7.0)
    second = n.agent.epilog(make_job(12, mps_pct=50))
    assert first is not None and second is not None
    delta_j = n.gpu.energy_j(0) - start_j
    assert first.energy_j + second.energy_j == pytest.approx(delta_j, rel=0.01)
    assert first.energy_j > 0 and second.energy_j > 0
    # The GPU is idle: default clock, MPS daemon gone, no workloads.
    assert n.gpu.current_clock_mhz(0) == n.gpu.spec.max_clock_mhz
    assert not n.mps.running(0, n.paths.mps_pipe_dir(0))
    assert n.gpu.workloads(0) == ()
    assert n.state.read().gpu(0).clock_mhz is None


def test_idle_time_goes_to_the_pool_not_to_a_job(sim_node: SimNode) -> None:
    n = sim_node
    n.agent.prolog(make_job(11))
    n.clock.advance(3.0)
    n.agent.epilog(make_job(11))
    n.clock.advance(100.0)  # idle
    n.agent.prolog(make_job(12))
    gpu = n.state.read().gpu(0)
    assert gpu.idle_pool_j == pytest.approx(100.0 * n.gpu.spec.idle_w)


def test_a_crashed_mps_daemon_is_restarted_and_its_clients_requeued(sim_node: SimNode) -> None:
    n = sim_node
    n.agent.prolog(make_job(21, mps_pct=30))
    n.agent.prolog(make_job(22, gpus=(1,), mps_pct=None))  # whole GPU 1, no MPS
    daemon = n.mps.daemon(0)
    assert daemon is not None
    os.kill(daemon["pid"], signal.SIGKILL)
    os.waitpid(daemon["pid"], 0)
    report = n.agent.control_tick()
    assert report.mps_restarted == (0,)
    assert report.requeued == (21,)
    assert n.slurm.requeued == [(21, ("n1",))]
    restarted = n.mps.daemon(0)
    assert restarted is not None and restarted["pid"] != daemon["pid"]
    assert n.mps.running(0, n.paths.mps_pipe_dir(0))
    assert n.agent.control_tick().requeued == ()


def test_clock_changes_are_rate_limited_downwards_and_immediate_upwards(sim_node: SimNode) -> None:
    n = sim_node
    n.agent.prolog(make_job(31, clock_mhz=1500))
    n.agent.request_settings(0, 1200, {})
    n.clock.advance(2.0)
    assert n.agent.control_tick().clock_changes == {}  # lower: waits for clock_min_interval_s
    n.clock.advance(9.0)
    assert n.agent.control_tick().clock_changes == {0: 1200}
    n.agent.request_settings(0, 1800, {})
    assert n.agent.control_tick().clock_changes == {0: 1800}  # higher: at once
    assert n.gpu.current_clock_mhz(0) == 1800


def test_a_requested_share_is_kept_as_wanted_and_never_changed_in_place(sim_node: SimNode) -> None:
    n = sim_node
    n.agent.prolog(make_job(41, mps_pct=60))
    n.agent.prolog(make_job(42, mps_pct=40))
    n.agent.request_settings(0, None, {41: 30, 42: 70})
    for _ in range(3):
        assert n.agent.control_tick().share_changes == {}
    jobs = {j.job_id: (j.sm_pct, j.desired_sm_pct) for j in n.state.read().gpu(0).jobs}
    assert jobs == {41: (60.0, 30.0), 42: (40.0, 70.0)}  # a restart's business (festinad), shown in the state
    daemon = n.mps.daemon(0)
    assert daemon is not None and daemon["server_pct"] == {}
    n.agent.request_settings(0, None, {41: 60})  # its own share again: nothing wanted any more
    assert n.state.read().gpu(0).job(41).desired_sm_pct is None  # type: ignore[union-attr]


def test_with_live_share_change_sm_shares_change_at_safe_points_shrinks_first(sim_node: SimNode) -> None:
    n = sim_node
    agent = NodeAgent("n1", n.gpu, n.mps, n.state, n.paths, clock=n.clock, live_share_change=True)
    agent.prolog(make_job(41, mps_pct=60))
    agent.prolog(make_job(42, mps_pct=40))
    agent.request_settings(0, None, {41: 30, 42: 70})
    first = agent.control_tick()
    assert first.share_changes == {41: 30.0}  # the shrink; the grow waits a tick
    assert agent.control_tick().share_changes == {42: 70.0}
    assert sorted(j.sm_pct for j in n.state.read().gpu(0).jobs) == [30.0, 70.0]


def test_requests_that_would_oversubscribe_or_name_other_jobs_are_refused(sim_node: SimNode) -> None:
    n = sim_node
    n.agent.prolog(make_job(51, mps_pct=60))
    n.agent.prolog(make_job(52, mps_pct=40))
    with pytest.raises(NodeInputError, match="sum to 110, more than 100"):
        n.agent.request_settings(0, None, {51: 70})
    with pytest.raises(NodeInputError, match="job 99 does not run on this GPU"):
        n.agent.request_settings(0, None, {99: 10})
    with pytest.raises(NodeInputError, match="this node has 2 GPUs"):
        n.agent.request_settings(7, None, {})


def test_task_prolog_points_an_mps_job_at_its_gpus_daemon(sim_node: SimNode) -> None:
    lines = sim_node.agent.task_prolog(make_job(61, gpus=(1,), mps_pct=35))
    assert lines == [f"export CUDA_MPS_PIPE_DIRECTORY={sim_node.paths.mps_pipe_dir(1)}",
                     f"export CUDA_MPS_LOG_DIRECTORY={sim_node.paths.mps_log_dir(1)}",
                     "export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=35"]
    assert sim_node.agent.task_prolog(make_job(62, mps_pct=None)) == []
