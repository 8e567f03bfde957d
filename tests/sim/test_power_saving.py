"""Slurm's power saving in the simulator: idle nodes suspended after suspend_time_s, resumed by a start."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.config import default_profiles_dir, load_config
from festina_hpc.policy.base import Policy, PolicyContext, make_policy
from festina_hpc.policy.common import free_gpu_group, place_on_whole_gpus, route_with_room, waits_for_node
from festina_hpc.policy.types import (
    ClusterView,
    Drop,
    InstancePhase,
    NodePower,
    Placement,
    Plan,
    Request,
    Route,
    StartInstance,
    StopInstance,
)
from festina_hpc.profiles.calibration_doc import CLUSTER_FIGURES
from festina_hpc.sim.cluster import SimNode
from festina_hpc.sim.experiment import ExperimentOptions, build_experiment
from festina_hpc.sim.simulator import SimResult, Simulation
from tests.policy.conftest import GPU, STORE, FakeInstance, FakeView, slos_for

MODEL = "llama-3.1-8b"


class StartThenStop(Policy):
    """One instance on GPU 0 from the start, stopped at ``stop_s``; requests go to it while it lives."""

    name = "test-start-then-stop"
    scale_period_s = 50.0
    stop_s = 500.0

    def place(self, request: Request, view: ClusterView) -> Placement:
        live = [i for i in view.instances_of(request.model) if i.phase <= InstancePhase.READY]
        return Route(live[0].id) if live else Drop("stopped")

    def scale(self, view: ClusterView) -> Plan:
        if view.now_s == 0.0:
            return Plan((StartInstance(MODEL, (0,)),))
        if view.now_s == self.stop_s:
            return Plan(tuple(StopInstance(i.id) for i in view.instances()))
        return Plan()


class Recording(Simulation):
    """Records when each node is suspended."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.suspended: list[tuple[float, int]] = []

    def _suspend(self, node: SimNode) -> None:
        before = self.node_suspends
        super()._suspend(node)
        if self.node_suspends > before:
            self.suspended.append((self._now, node.id))


def requests_every(period_s: float, until_s: float, model: str = MODEL) -> list[Request]:
    """Short requests half a period apart from the policy's ticks (the instance is idle at each)."""
    return [Request(i, period_s * (i + 0.5), model, 200, 20) for i in range(int(until_s / period_s))]


def run(policy: Policy | str, requests: Sequence[Request], **cluster: object) -> tuple[Recording, SimResult]:
    if isinstance(policy, str):
        policy = make_policy(policy, PolicyContext(STORE, GPU, keep_alive_s=60.0))
    config = ClusterConfig(**{"nodes": 2, "gpus_per_node": 1, **cluster})  # type: ignore[arg-type]
    sim = Recording(config, STORE, policy, requests, slos_for({r.model for r in requests}))
    return sim, sim.run()


@pytest.mark.parametrize("suspend_time_s", [300.0, 120.0])
def test_a_node_is_suspended_suspend_time_after_its_last_instance_went_and_not_before(suspend_time_s: float) -> None:
    """Node 1 never holds an instance: off suspend_time_s after the start. Node 0 holds one until
    500 s: off suspend_time_s after that, not while it held it."""
    sim, result = run(StartThenStop(PolicyContext(STORE, GPU)), requests_every(100.0, 1200.0),
                      suspend_time_s=suspend_time_s)
    assert sim.suspended == [(suspend_time_s, 1), (500.0 + suspend_time_s, 0)]
    assert sim.node_list[1].powered_s == pytest.approx(suspend_time_s)
    assert sim.node_list[0].powered_s == pytest.approx(500.0 + suspend_time_s)
    assert result.node_suspends == 2 and result.node_wakes == 0


def test_standby_energy_is_counted_and_a_suspended_nodes_gpus_draw_nothing() -> None:
    sim, result = run(StartThenStop(PolicyContext(STORE, GPU)), requests_every(100.0, 1200.0))
    config = sim.config
    end_s = result.sim_time_s
    powered_s = [300.0, 800.0]  # node 1 went at 300 s, node 0 at 800 s
    assert result.energy_parts_j["standby_j"] == pytest.approx(config.standby_w * sum(end_s - p for p in powered_s))
    assert result.energy_parts_j["node_static_j"] == pytest.approx(config.node_static_w_per_gpu * sum(powered_s))
    # GPU idle power only while powered: node 1's GPU for 300 s, node 0's while its instance
    # lived (after its load) and 300 s more.
    spec = STORE.gpu(GPU)
    gpu_powered_j = (result.energy_parts_j["gpu_idle_j"] + result.energy_parts_j["cold_start_j"]
                     + result.energy_parts_j["gpu_active_j"])
    assert gpu_powered_j < spec.tdp_w * sum(powered_s)
    assert result.energy_parts_j["gpu_idle_j"] <= spec.idle_with_context_w * sum(powered_s) + 1e-6


def test_with_power_saving_none_every_node_stays_on() -> None:
    sim, result = run(StartThenStop(PolicyContext(STORE, GPU)), requests_every(100.0, 1200.0), power_saving="none")
    assert not sim.suspended and result.node_suspends == 0
    assert result.node_hours_powered == pytest.approx(2 * result.sim_time_s / 3600)
    assert result.energy_parts_j["standby_j"] == 0.0


def test_suspend_exc_nodes_are_never_suspended() -> None:
    sim, _ = run(StartThenStop(PolicyContext(STORE, GPU)), requests_every(100.0, 1200.0), nodes=3,
                 suspend_exc_nodes=2)
    assert sim.suspended == [(300.0, 2)]


def test_a_start_on_a_suspended_node_waits_for_its_resume() -> None:
    """serverlessllm on one GPU: its instance stops after the keep-alive, the node is suspended, and
    a request after that finds no powered GPU: its start resumes the node and it waits
    resume_time_s more than without power saving."""
    requests = [Request(0, 10.0, MODEL, 200, 20), Request(1, 1000.0, MODEL, 200, 20)]

    def second_ttft_s(power_saving: str) -> tuple[float, SimResult]:
        sim, result = run("serverlessllm", requests, nodes=1, power_saving=power_saving)
        second = sim.records[1]
        return second.first_token_s - second.request.arrival_s, result

    slurm_s, slurm = second_ttft_s("slurm")
    none_s, none = second_ttft_s("none")
    assert slurm.node_suspends == 1 and slurm.node_wakes == 1 and slurm.requests_completed == 2
    assert none.node_suspends == 0
    config = ClusterConfig()
    assert config.resume_time_s < slurm_s < config.resume_time_s + 60.0
    assert none_s < 60.0


class PoweredView(FakeView):
    """free_gpus() as the simulator answers it: GPUs of nodes that are off are not offered."""

    def free_gpus(self) -> list[int]:
        return [g for g in super().free_gpus() if self.node(self.gpu(g).node).power is not NodePower.OFF]


def test_free_gpu_group_falls_back_to_a_suspended_node_unless_told_not_to_wake() -> None:
    view = PoweredView(nodes=3, gpus_per_node=2)
    view.add(FakeInstance(1, MODEL, (0, 1)))  # node 0 full
    view.node(1).power = NodePower.OFF
    view.node(2).power = NodePower.OFF
    assert free_gpu_group(view, 2) == (2, 3)  # the first node that is off
    assert free_gpu_group(view, 2, exclude={2}) == (4, 5)
    assert free_gpu_group(view, 2, wake=False) is None


@pytest.mark.parametrize("policy", ["vllm", "serverlessllm", "muxserve", "llumnix", "dynamollm", "festina"])
def test_every_policy_starts_an_instance_when_the_only_free_gpus_are_on_suspended_nodes(policy: str) -> None:
    """Node 0 busy with another model, node 1 suspended: a request for a model with no instance
    resumes node 1 (a start on its GPU), whatever the policy."""
    view = PoweredView(nodes=2, gpus_per_node=1, now_s=1000.0, models=(MODEL, "mistral-7b"))
    view.add(FakeInstance(1, "mistral-7b", (0,), running=40, last_busy_s=1000.0))
    view.node(1).power = NodePower.OFF
    chosen = make_policy(policy, PolicyContext(STORE, GPU))
    chosen.scale(view)  # festina looks at the cluster's headroom on its scale tick
    decision = chosen.place(Request(7, 1000.0, MODEL, 2000, 200), view)
    assert isinstance(decision, StartInstance) and decision.gpus == (1,), decision


def test_a_request_queues_at_a_ready_instance_while_a_start_waits_for_a_resuming_node() -> None:
    view = FakeView(nodes=3, gpus_per_node=1, models=(MODEL,))
    ready = view.add(FakeInstance(1, MODEL, (0,), running=256, waiting=50, kv_tokens_reserved=199_000))
    resuming = view.add(FakeInstance(2, MODEL, (1,), phase=InstancePhase.LOADING))
    view.node(1).power = NodePower.WAKING
    view.node(2).power = NodePower.OFF
    request = Request(7, 0.0, MODEL, 200, 20)
    assert waits_for_node(view, resuming) and not waits_for_node(view, ready)
    assert route_with_room(STORE, view, request, [ready, resuming], STORE.gpu(GPU).max_clock_mhz) is None
    assert place_on_whole_gpus(STORE, view, request, STORE.gpu(GPU).max_clock_mhz) == Route(ready.id)
    # No ready instance: the resuming one is where the request is served first.
    alone = FakeView(nodes=2, gpus_per_node=1, models=(MODEL,))
    only = alone.add(FakeInstance(2, MODEL, (1,), phase=InstancePhase.LOADING))
    alone.node(1).power = NodePower.WAKING
    assert route_with_room(STORE, alone, request, [only], STORE.gpu(GPU).max_clock_mhz) is only


def test_power_saving_option_overrides_the_config(tmp_path: Path) -> None:
    path = tmp_path / "festina.toml"
    path.write_text('[cluster]\npower_saving = "none"\n', encoding="utf-8")
    config = load_config(path)
    store = config.profiles.open_store()
    options = ExperimentOptions(trace="azure-code", models=2, duration_s=30.0)
    assert build_experiment(config, store, options).cluster.power_saving == "none"
    overridden = build_experiment(config, store, dataclasses.replace(options, power_saving="slurm"))
    assert overridden.cluster.power_saving == "slurm" and overridden.resolved["cluster"]["power_saving"] == "slurm"


def test_baselines_power_idle_nodes_off_on_the_code_trace() -> None:
    """The issue's check, smaller: vllm (which never stops an instance) on 6 nodes, 4 models: the
    nodes it does not need are suspended, so it powers fewer node-hours than the run's length
    times the nodes; without power saving every node is on all along."""
    config = load_config(None)
    store = config.profiles.open_store()
    options = ExperimentOptions(trace="azure-code", models=4, nodes=6, duration_s=600.0)
    slurm = build_experiment(config, store, dataclasses.replace(options, power_saving="slurm")).run(store, "vllm")
    none = build_experiment(config, store, dataclasses.replace(options, power_saving="none")).run(store, "vllm")
    assert slurm.node_hours_powered < 0.9 * 6 * slurm.sim_time_s / 3600
    assert none.node_hours_powered == pytest.approx(6 * none.sim_time_s / 3600)
    assert slurm.energy_j < none.energy_j and slurm.slo_attainment >= none.slo_attainment - 0.01


def test_the_power_saving_figures_are_sourced_in_calibration_md() -> None:
    """The shipped CALIBRATION.md holds the section its renderer writes, naming every power-saving figure."""
    shipped = (Path(default_profiles_dir()) / "CALIBRATION.md").read_text(encoding="utf-8")
    assert CLUSTER_FIGURES in shipped
    defaults = ClusterConfig()
    for name in ("power_saving", "suspend_time_s", "resume_time_s", "standby_w", "suspend_exc_nodes"):
        assert f"`{name} = " in CLUSTER_FIGURES, name
    assert f"`resume_time_s = {defaults.resume_time_s:g}`" in CLUSTER_FIGURES
    assert f"`standby_w = {defaults.standby_w:g}`" in CLUSTER_FIGURES
