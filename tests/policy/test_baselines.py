"""Each baseline's mechanism, checked on the real simulator with small seeded workloads and on a fake view."""

from __future__ import annotations

import math

import numpy as np
import pytest

import festina_hpc.sim.experiment as experiment_module
from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.policy.base import Policy, PolicyContext, UnknownPolicyError, make_policy, policy_names
from festina_hpc.policy.baselines.dynamollm import (
    LOAD_MARGIN,
    PEAK_WINDOW_S,
    SCALE_IN_WINDOW_S,
    STOP_IDLE_S,
    DynamoLlmPolicy,
    pool_of,
)
from festina_hpc.policy.baselines.llumnix import LlumnixPolicy
from festina_hpc.policy.baselines.muxserve import MuxServePolicy, proportional_shares
from festina_hpc.policy.common import TBT_PLANNING, TTFT_PLANNING, predicted_tbt_s, prefill_time_s, sampled
from festina_hpc.policy.types import (
    ClusterView,
    GpuSettings,
    GpuView,
    InstancePhase,
    MoveQueued,
    Plan,
    Request,
    Route,
    StartInstance,
    StopInstance,
)
from festina_hpc.sim.experiment import Experiment
from tests.policy.conftest import (
    GPU,
    MODELS,
    POLICIES,
    STORE,
    FakeInstance,
    FakeView,
    bursts,
    make_policy_for,
    make_slo,
    poisson_requests,
    request,
    simulate,
    simulation,
    slos_for,
    used_gpus,
)

LIGHT_RATES = {"llama-3.1-8b": 2.0, "mistral-7b": 1.0, "llama-2-13b": 0.5}


@pytest.fixture(scope="module")
def light_workload() -> list[Request]:
    return poisson_requests(np.random.default_rng(1), LIGHT_RATES, duration_s=120.0)


# -- every policy ------------------------------------------------------------------------------------


def test_every_baseline_is_registered() -> None:
    assert set(POLICIES) <= set(policy_names())


def test_unknown_policy_lists_the_known_names() -> None:
    with pytest.raises(UnknownPolicyError) as err:
        make_policy("nope", PolicyContext(STORE, GPU))
    for name in POLICIES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", POLICIES)
def test_serves_a_light_workload_completely(name: str, light_workload: list[Request]) -> None:
    result = simulate(name, light_workload)
    assert len(light_workload) > 300
    assert result.requests_completed == len(light_workload)
    assert result.requests_dropped == 0
    assert result.invalid_decisions == 0
    assert result.tbt_attainment > 0.99


# -- serverlessllm -----------------------------------------------------------------------------------


def test_serverlessllm_cold_starts_after_each_gap_longer_than_keep_alive() -> None:
    rates = {"llama-3.1-8b": 2.0, "mistral-7b": 1.0}
    gappy = bursts(np.random.default_rng(2), rates, burst_s=30.0, gap_s=90.0, count=3)
    assert simulate("serverlessllm", gappy, keep_alive_s=30.0).cold_starts == 3 * len(rates)
    assert simulate("serverlessllm", gappy, keep_alive_s=120.0).cold_starts == len(rates)
    # vllm keeps its instances warm: the gaps add no cold start to what the first burst needed.
    first_burst = [r for r in gappy if r.arrival_s < 30.0]
    assert (simulate("vllm", gappy, keep_alive_s=30.0).cold_starts
            == simulate("vllm", first_burst, keep_alive_s=30.0).cold_starts)


@pytest.mark.parametrize("idle_s,stopped", [(61.0, True), (59.0, False)])
def test_serverlessllm_stops_an_instance_idle_past_keep_alive(idle_s: float, stopped: bool) -> None:
    view = FakeView(now_s=1000.0)
    idle = view.add(FakeInstance(0, "llama-3.1-8b", (0,), last_busy_s=1000.0 - idle_s))
    view.add(FakeInstance(1, "mistral-7b", (1,), running=3, last_busy_s=0.0))  # busy: never stopped
    plan = make_policy_for("serverlessllm", keep_alive_s=60.0).scale(view)
    assert plan.actions == ((StopInstance(idle.id),) if stopped else ())


@pytest.mark.parametrize("cached_on,expected_node", [({1}, 1), (set(), 0), ({0, 1}, 0)])
def test_serverlessllm_starts_where_the_model_is_cached(cached_on: set[int], expected_node: int) -> None:
    view = FakeView(nodes=2, gpus_per_node=4)
    for n in cached_on:
        view.node(n).cached.add("llama-3.1-8b")
    decision = make_policy_for("serverlessllm").place(request(), view)
    assert isinstance(decision, StartInstance)
    assert {view.gpu(g).node for g in decision.gpus} == {expected_node}


def test_serverlessllm_evicts_the_least_recently_used_idle_instance_when_no_gpu_is_free() -> None:
    view = FakeView(gpus_per_node=2, now_s=100.0)
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), last_busy_s=80.0))
    view.add(FakeInstance(1, "mistral-7b", (1,), last_busy_s=50.0))
    policy = make_policy_for("serverlessllm", keep_alive_s=60.0)
    assert not policy.scale(view)  # both within their keep-alive; it learns they are idle
    decision = policy.place(request("llama-2-13b"), view)
    assert decision == StartInstance("llama-2-13b", (1,), evict=(1,))


def test_serverlessllm_serves_a_third_model_on_two_gpus_by_eviction() -> None:
    requests = [request("llama-3.1-8b", rid=0, arrival_s=0.0), request("mistral-7b", rid=1, arrival_s=1.0),
                request("llama-2-13b", rid=2, arrival_s=40.0), request("llama-2-13b", rid=3, arrival_s=41.0)]
    result = simulate("serverlessllm", requests, gpus_per_node=2)
    assert (result.requests_completed, result.cold_starts, result.invalid_decisions) == (4, 3, 0)
    # vllm deploys two of the three models up front and never evicts: the third one's request is dropped.
    assert simulate("vllm", requests, gpus_per_node=2).requests_dropped == 1


# -- muxserve ----------------------------------------------------------------------------------------


def _muxserve(known_rates: dict[str, float] | None = None, live_share_change: bool = False) -> MuxServePolicy:
    return MuxServePolicy(PolicyContext(STORE, GPU, known_rates_per_s=known_rates or {},
                                        live_share_change=live_share_change))


def test_muxserve_colocates_models_on_fewer_gpus_than_models(light_workload: list[Request]) -> None:
    sim = simulation(_muxserve(LIGHT_RATES), light_workload)
    result = sim.run()
    assert result.requests_completed == len(light_workload)
    assert len(used_gpus(sim)) < len(LIGHT_RATES)
    shared = [g for g in sim.gpus() if len(g.instances) >= 2]
    assert shared
    for gpu in sim.gpus():
        assert gpu.sm_pct_allocated <= 100.0 + 1e-6
        assert gpu.memory_fraction_allocated <= 1.0 + 1e-6
    dedicated = simulation("vllm", light_workload)
    dedicated.run()
    assert len(used_gpus(dedicated)) == len(LIGHT_RATES)


def test_muxserve_shares_follow_load_and_fit_the_gpu() -> None:  # where a site has live share change
    view = FakeView()
    busy = view.add(FakeInstance(0, "llama-3.1-8b", (0,), sm_pct=50.0, memory_fraction=0.4, arrival_rate_per_s=4.0))
    quiet = view.add(FakeInstance(1, "mistral-7b", (0,), sm_pct=50.0, memory_fraction=0.4, arrival_rate_per_s=0.1))
    settings = _muxserve(live_share_change=True).control(view.gpu(0), view)
    assert isinstance(settings, GpuSettings)
    shares = settings.sm_pct
    assert shares[busy.id] > shares[quiet.id] >= 10.0
    assert sum(shares.values()) <= 100.0
    assert settings.clock_mhz is None  # default (max) clock


def test_muxserve_shares_swap_when_the_load_does() -> None:
    view = FakeView()
    a = view.add(FakeInstance(0, "llama-3.1-8b", (0,), sm_pct=50.0, memory_fraction=0.4, arrival_rate_per_s=0.1))
    b = view.add(FakeInstance(1, "mistral-7b", (0,), sm_pct=50.0, memory_fraction=0.4, arrival_rate_per_s=4.0))
    settings = _muxserve(live_share_change=True).control(view.gpu(0), view)
    assert settings is not None and settings.sm_pct[b.id] > settings.sm_pct[a.id]


def test_muxserve_leaves_shares_alone_within_the_step() -> None:
    view = FakeView()
    policy = _muxserve(live_share_change=True)
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), sm_pct=50.0, memory_fraction=0.4, arrival_rate_per_s=1.0))
    view.add(FakeInstance(1, "mistral-7b", (0,), sm_pct=40.0, memory_fraction=0.4, arrival_rate_per_s=1.0))
    first = policy.control(view.gpu(0), view)
    assert first is not None
    for instance_id, share in first.sm_pct.items():
        view.instance(instance_id).sm_pct = share
    assert policy.control(view.gpu(0), view) is None


def test_muxserve_colocates_a_new_model_on_a_used_gpu_with_room() -> None:
    view = FakeView(model_rates={"mistral-7b": 0.5})
    policy = make_policy_for("muxserve")
    assert isinstance(policy, MuxServePolicy)
    first = policy.place(request("llama-3.1-8b"), view)
    assert isinstance(first, StartInstance) and first.memory_fraction < 0.6 and first.sm_pct < 100
    view.add(FakeInstance(0, first.model, first.gpus, sm_pct=first.sm_pct, memory_fraction=first.memory_fraction))
    second = policy.place(request("mistral-7b"), view)
    assert isinstance(second, StartInstance) and second.gpus == first.gpus
    assert second.sm_pct + first.sm_pct <= 100 and second.memory_fraction + first.memory_fraction <= 1


@pytest.mark.parametrize("rates", [
    {"llama-3.1-8b": 4.0, "mistral-7b": 0.3, "llama-2-13b": 0.2},
    {"llama-3.1-8b": 0.3, "mistral-7b": 4.0, "llama-2-13b": 0.2},
])
def test_muxserve_places_every_model_at_its_first_scale_tick_from_known_rates(rates: dict[str, float]) -> None:
    view = FakeView()
    policy = _muxserve(rates)
    plan = policy.scale(view)
    starts = [a for a in plan.actions if isinstance(a, StartInstance)]
    assert sorted(s.model for s in starts) == sorted(rates)  # every model, before any request
    assert len({g for s in starts for g in s.gpus}) < len(rates)  # co-located
    by_model = {s.model: s for s in starts}
    for start in starts:  # a share at least the need its known rate gives, memory as its rate needs
        assert start.sm_pct >= policy.need_pct(view, start.model, rates[start.model])
        assert start.memory_fraction == policy.memory_fraction(view, start.model, rates[start.model])
    for g in {g for s in starts for g in s.gpus}:
        assert sum(s.sm_pct for s in starts if g in s.gpus) <= 100.0
        assert sum(s.memory_fraction for s in starts if g in s.gpus) <= 1.0 + 1e-9
    busy, quiet = sorted(("llama-3.1-8b", "mistral-7b"), key=lambda m: -rates[m])
    if by_model[busy].gpus == by_model[quiet].gpus:
        assert by_model[busy].sm_pct > by_model[quiet].sm_pct  # the busier model gets the larger share
    assert not policy.scale(view)  # placed once


def test_muxserve_without_known_rates_places_on_the_first_request() -> None:
    policy = _muxserve()
    view = FakeView()
    assert not policy.scale(view)
    assert isinstance(policy.place(request(), view), StartInstance)


def test_muxserve_never_changes_a_running_share() -> None:
    view = FakeView()
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), sm_pct=50.0, memory_fraction=0.4, arrival_rate_per_s=4.0))
    view.add(FakeInstance(1, "mistral-7b", (0,), sm_pct=50.0, memory_fraction=0.4, arrival_rate_per_s=0.1))
    assert _muxserve().control(view.gpu(0), view) is None
    assert _muxserve(live_share_change=True).control(view.gpu(0), view) is not None


class ControlRecordingMuxServe(MuxServePolicy):
    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.changes: list[GpuSettings] = []

    def control(self, gpu: GpuView, view: ClusterView) -> GpuSettings | None:
        settings = super().control(gpu, view)
        if settings is not None:
            self.changes.append(settings)
        return settings


def test_muxserve_keeps_its_shares_through_a_run(light_workload: list[Request]) -> None:
    policy = ControlRecordingMuxServe(PolicyContext(STORE, GPU, known_rates_per_s=LIGHT_RATES))
    result = simulate(policy, light_workload)
    assert result.requests_completed == len(light_workload)
    assert policy.changes == []


@pytest.mark.parametrize("needs,budget,expected", [
    ({1: 30.0, 2: 30.0}, 100.0, {1: 50.0, 2: 50.0}),
    ({1: 60.0, 2: 20.0}, 80.0, {1: 60.0, 2: 20.0}),
    ({1: 95.0, 2: 1.0}, 100.0, {1: 90.0, 2: 10.0}),  # the minimum share holds
    ({1: 0.0, 2: 0.0, 3: 0.0}, 90.0, {1: 30.0, 2: 30.0, 3: 30.0}),
])
def test_proportional_shares(needs: dict[int, float], budget: float, expected: dict[int, float]) -> None:
    assert proportional_shares(needs, budget, 10.0) == expected


# -- llumnix -----------------------------------------------------------------------------------------


def _burst_behind_a_slow_load() -> list[Request]:
    """A warm instance on node 0; at 21 s a burst that also needs a second instance on node 1, whose
    weights are not cached there (a slow load): its queue waits while the warm one runs dry."""
    return [request(rid=0, output_tokens=32)] + [
        request(rid=i, output_tokens=32, arrival_s=21.0 + i * 1e-3) for i in range(1, 401)]


class LlumnixWithoutMigration(LlumnixPolicy):
    name = "test-llumnix-without-migration"

    def consolidate(self, view: ClusterView) -> Plan:
        return Plan()


def test_llumnix_moves_queued_requests_to_an_idle_instance() -> None:
    workload = _burst_behind_a_slow_load()
    llumnix = simulate("llumnix", workload, nodes=2, gpus_per_node=1)
    without = simulate(LlumnixWithoutMigration(PolicyContext(STORE, GPU)), workload, nodes=2, gpus_per_node=1)
    assert llumnix.requests_completed == without.requests_completed == len(workload)
    assert llumnix.invalid_decisions == 0
    assert llumnix.request_migrations > 0 and without.request_migrations == 0
    assert llumnix.ttft_p50_s < without.ttft_p50_s


def test_llumnix_rebalances_the_most_imbalanced_pair() -> None:
    view = FakeView()
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), running=40, waiting=60))
    view.add(FakeInstance(1, "llama-3.1-8b", (1,), running=10, waiting=0))
    view.add(FakeInstance(2, "llama-3.1-8b", (2,), running=30, waiting=0))
    view.add(FakeInstance(3, "llama-3.1-8b", (3,), phase=InstancePhase.LOADING, waiting=5))
    plan = make_policy_for("llumnix").consolidate(view)
    assert plan.actions == (MoveQueued(0, 1, 45),)  # half the difference in load, to the least loaded ready one


def test_llumnix_leaves_a_balanced_model_alone() -> None:
    view = FakeView()
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), running=40, waiting=5))
    view.add(FakeInstance(1, "llama-3.1-8b", (1,), running=30, waiting=0))
    assert not make_policy_for("llumnix").consolidate(view)


def test_llumnix_scales_in_idle_instances_but_keeps_the_last() -> None:
    view = FakeView(now_s=500.0)
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), last_busy_s=100.0))
    view.add(FakeInstance(1, "llama-3.1-8b", (1,), last_busy_s=200.0))
    view.add(FakeInstance(2, "mistral-7b", (2,), last_busy_s=100.0))
    plan = make_policy_for("llumnix", keep_alive_s=60.0).scale(view)
    assert plan.actions == (StopInstance(0),)


# -- dynamollm ---------------------------------------------------------------------------------------


class ClockSampling(DynamoLlmPolicy):
    """dynamollm that records the clocks of GPUs holding an instance on every scale tick."""

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.samples_mhz: list[int] = []

    def scale(self, view: ClusterView) -> Plan:
        self.samples_mhz += [g.clock_mhz for g in view.gpus() if g.instances]
        return super().scale(view)


def test_dynamollm_lowers_clocks_and_saves_energy_at_equal_slo(light_workload: list[Request]) -> None:
    policy = ClockSampling(PolicyContext(STORE, GPU))
    dynamo = simulate(policy, light_workload)
    vllm = simulate("vllm", light_workload)
    assert np.mean(policy.samples_mhz) < STORE.gpu(GPU).max_clock_mhz - 200
    assert dynamo.energy_j < vllm.energy_j
    assert dynamo.energy_parts_j["gpu_active_j"] < 0.9 * vllm.energy_parts_j["gpu_active_j"]
    assert dynamo.slo_attainment >= vllm.slo_attainment - 0.02
    assert dynamo.invalid_decisions == 0


def _one_instance_view(clock_mhz: int, running: int) -> FakeView:
    view = FakeView()
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), running=running))
    view.gpu(0).clock_mhz = clock_mhz
    return view


def test_dynamollm_picks_the_lowest_table_clock_under_light_load() -> None:
    view = _one_instance_view(1980, 4)
    settings = make_policy_for("dynamollm").control(view.gpu(0), view)
    assert settings == GpuSettings(clock_mhz=min(STORE.gpu(GPU).table_clocks_mhz))


def test_dynamollm_holds_a_clock_one_table_step_away() -> None:
    clocks = sorted(STORE.gpu(GPU).table_clocks_mhz)
    view = _one_instance_view(clocks[1], 4)
    assert make_policy_for("dynamollm").control(view.gpu(0), view) is None


def test_dynamollm_raises_the_clock_at_once_when_a_target_would_break() -> None:
    policy = make_policy_for("dynamollm")
    assert isinstance(policy, DynamoLlmPolicy)
    for _ in range(200):  # long prompts: prefill at the lowest clock misses the TTFT target
        policy.pool_stats[-1].observe_prompt("llama-3.1-8b", 3000)
    clocks = sorted(STORE.gpu(GPU).table_clocks_mhz)
    view = _one_instance_view(clocks[0], 4)  # an instance it did not start: the long pool
    settings = policy.control(view.gpu(0), view)
    assert settings is not None and settings.clock_mhz is not None and settings.clock_mhz > clocks[0]
    margin = 1.0 + LOAD_MARGIN
    assert policy.meets_slo(view.instance(0), view, settings.clock_mhz, margin)
    lower = clocks[clocks.index(settings.clock_mhz) - 1]
    assert not policy.meets_slo(view.instance(0), view, lower, margin)  # the lowest that meets them


def _place_steadily(policy: DynamoLlmPolicy, view: FakeView, rate_per_s: float, start_s: float, end_s: float,
                    prompt_tokens: int = 3000, scale_every_s: float = 0.0) -> list[StopInstance]:
    """Requests at ``rate_per_s`` over [start_s, end_s) through place(); scale() every ``scale_every_s``
    seconds (0: never); the stops it asks for, carried out on the view."""
    stops: list[StopInstance] = []
    t, next_scale = start_s, start_s
    while t < end_s:
        view.now_s = t
        policy.place(request(prompt_tokens=prompt_tokens, arrival_s=t), view)
        if scale_every_s and t >= next_scale:
            for action in policy.scale(view).actions:
                if isinstance(action, StopInstance):
                    view.remove(action.instance_id)
                    stops.append(action)
            next_scale += scale_every_s
        t += 1.0 / rate_per_s
    return stops


def test_dynamollm_instance_count_follows_load_up_and_down() -> None:
    policy = make_policy_for("dynamollm")
    assert isinstance(policy, DynamoLlmPolicy)
    model = "llama-3.1-8b"
    view = FakeView(now_s=0.0)
    view.add(FakeInstance(0, model, (0,), running=0))  # one instance (the long pool: any length)
    _place_steadily(policy, view, 3.0, 0.0, 5.0)  # learn the lengths at a low rate
    capacity = policy.capacity_per_s(view, model, 2)
    high = 2.6 * capacity
    _place_steadily(policy, view, high, 5.0, 35.0)
    plan = policy.scale(view)
    starts = [a for a in plan.actions if isinstance(a, StartInstance)]
    assert len(starts) + 1 == math.ceil(high / capacity) == 3  # up to the load at once
    for k, start in enumerate(starts, start=1):
        view.add(FakeInstance(k, model, start.gpus))
    assert not policy.scale(view)  # at the count: nothing more
    # The load falls to a third of an instance: no scale-in while the peak is in the window, nor for
    # SCALE_IN_WINDOW_S after, then down to one instance (not zero: the model is in use).
    low = capacity / 3
    early = _place_steadily(policy, view, low, 35.0, 35.0 + SCALE_IN_WINDOW_S + 60.0, scale_every_s=5.0)
    assert early == []
    late = _place_steadily(policy, view, low, view.now_s + 1.0, view.now_s + SCALE_IN_WINDOW_S + 60.0,
                           scale_every_s=5.0)
    assert len(late) == 2 and len(view.instances_of(model)) == 1
    assert not policy.scale(view)
    # Silent for twice the window: to zero.
    view.now_s += 2 * SCALE_IN_WINDOW_S + 20.0
    policy.scale(view)
    view.now_s += SCALE_IN_WINDOW_S + 10.0
    assert policy.scale(view).actions == (StopInstance(view.instances_of(model)[0].id),)


def test_dynamollm_pools_run_short_prompts_at_a_lower_clock_than_long_ones() -> None:
    policy = make_policy_for("dynamollm")
    assert isinstance(policy, DynamoLlmPolicy)
    model = "llama-3.1-8b"
    view = FakeView(now_s=0.0)
    view.add(FakeInstance(0, model, (0,), running=24))  # an instance it did not start: the long pool
    _place_steadily(policy, view, 2.0, 0.0, 100.0, prompt_tokens=200)  # learn the lengths
    rate_per_s = 2.5 * policy.capacity_per_s(view, model, 0)  # short load worth its own instances
    _place_steadily(policy, view, rate_per_s, 100.0, 130.0, prompt_tokens=200)
    for _ in range(300):  # and as many long prompts
        policy.place(request(prompt_tokens=6000, arrival_s=view.now_s), view)
    starts = [a for a in policy.scale(view).actions if isinstance(a, StartInstance)]
    assert starts
    view.add(FakeInstance(1, model, starts[0].gpus, running=24))
    assert (pool_of(200), pool_of(6000)) == (0, 2)
    assert (policy.pool_of_instance(view.instance(1)), policy.pool_of_instance(view.instance(0))) == (0, 2)
    clocks = {}
    for inst in (0, 1):
        gpu = view.gpu(view.instance(inst).gpus[0])
        settings = policy.control(gpu, view)
        clocks[inst] = gpu.clock_mhz if settings is None or settings.clock_mhz is None else settings.clock_mhz
    assert clocks[1] < clocks[0]


def test_dynamollm_runs_a_lightly_loaded_model_on_one_instance_whatever_its_lengths() -> None:
    """Pools split a model's instances only where a pool's load fills an instance: requests of
    every length at a fraction of one instance's capacity never start a second one."""
    policy = make_policy_for("dynamollm")
    assert isinstance(policy, DynamoLlmPolicy)
    model = "llama-3.1-8b"
    view = FakeView(now_s=0.0)
    next_id = 0
    for k in range(600):
        view.now_s = 0.5 * k
        prompt_tokens = (200, 1000, 4000)[k % 3]  # short, medium and long by turns
        placement = policy.place(request(prompt_tokens=prompt_tokens, rid=k, arrival_s=view.now_s), view)
        if isinstance(placement, StartInstance):
            view.add(FakeInstance(next_id, model, placement.gpus))
            next_id += 1
        if k % 10 == 0:
            for action in policy.scale(view).actions:
                if isinstance(action, StartInstance):
                    view.add(FakeInstance(next_id, model, action.gpus))
                    next_id += 1
    assert policy.capacity_per_s(view, model, 2) > 2.0  # 2 requests/s are under one instance's load
    assert len(view.instances_of(model)) == 1


def test_dynamollm_moves_an_instance_to_a_pool_short_of_instances_instead_of_starting_one() -> None:
    policy = make_policy_for("dynamollm")
    assert isinstance(policy, DynamoLlmPolicy)
    model = "llama-3.1-8b"
    view = FakeView(now_s=0.0)
    view.add(FakeInstance(0, model, (0,)))  # two instances it did not start: the long pool
    view.add(FakeInstance(1, model, (1,)))
    _place_steadily(policy, view, 2.0, 0.0, 100.0, prompt_tokens=200)  # learn the lengths
    rate_per_s = 1.1 * policy.capacity_per_s(view, model, 0)  # one short instance's worth
    _place_steadily(policy, view, rate_per_s, 100.0, 130.0, prompt_tokens=200)
    plan = policy.scale(view)
    assert not [a for a in plan.actions if isinstance(a, StartInstance)]
    assert sorted(policy.pool_of_instance(i) for i in view.instances_of(model)) == [0, 2]


def test_dynamollm_looks_at_every_instance_before_starting_one() -> None:
    """The router samples two instances; an instance outside the sample with room takes the request
    rather than a new instance."""
    policy = make_policy_for("dynamollm")
    view = FakeView()
    view.add(FakeInstance(0, "llama-3.1-8b", (0,)))  # room
    for k in (1, 2, 3):  # full: a long queue of prompts ahead of any new one
        view.add(FakeInstance(k, "llama-3.1-8b", (k,), running=200, waiting=100, prompt_tokens_each=4000))
    ready = view.instances_of("llama-3.1-8b")
    rid = next(r for r in range(100) if view.instance(0) not in sampled(ready, r))
    assert policy.place(request(rid=rid), view) == Route(0)


def test_dynamollm_holds_a_clock_for_the_recent_peak_load() -> None:
    """The clock meets the peak load of the last PEAK_WINDOW_S (the load prediction), not only the
    present one: after a burst the clock stays up for the window, then falls."""
    policy = make_policy_for("dynamollm")
    assert isinstance(policy, DynamoLlmPolicy)
    clocks = sorted(STORE.gpu(GPU).table_clocks_mhz)
    view = _one_instance_view(clocks[0], 0)
    inst = view.instance(0)
    inst.running, inst.waiting = 120, 20  # a burst
    settings = policy.control(view.gpu(0), view)
    assert settings is not None and settings.clock_mhz is not None and settings.clock_mhz > clocks[2]
    view.gpu(0).clock_mhz = burst_clock = settings.clock_mhz
    inst.running, inst.waiting = 1, 0  # the burst is over
    view.now_s = PEAK_WINDOW_S / 2
    assert policy.control(view.gpu(0), view) is None  # still within the window: held
    assert policy.lowest_clock_mhz(inst, view, 1.0 + LOAD_MARGIN) < burst_clock  # the present load alone
    view.now_s = PEAK_WINDOW_S + 1.0
    settings = policy.control(view.gpu(0), view)
    assert settings is not None and settings.clock_mhz is not None and settings.clock_mhz < burst_clock


def test_dynamollm_scales_in_only_idle_instances() -> None:
    policy = make_policy_for("dynamollm")
    assert isinstance(policy, DynamoLlmPolicy)
    model = "llama-3.1-8b"
    view = FakeView(now_s=0.0)
    view.add(FakeInstance(0, model, (0,), running=3))  # surplus to a light load, but busy
    view.add(FakeInstance(1, model, (1,), running=3))
    view.add(FakeInstance(2, model, (2,)))
    _place_steadily(policy, view, 0.5, 0.0, 3 * SCALE_IN_WINDOW_S, scale_every_s=5.0)
    assert [i.id for i in view.instances_of(model)] == [0, 1]  # the idle one went; busy ones stay
    view.instance(1).running = 0
    view.now_s += 2 * STOP_IDLE_S
    assert policy.scale(view).actions == (StopInstance(1),)


def test_dynamollm_routes_a_short_request_to_a_longer_pool_with_room() -> None:
    policy = make_policy_for("dynamollm")
    view = FakeView()
    long = policy.place(request(prompt_tokens=6000), view)
    assert isinstance(long, StartInstance)
    view.add(FakeInstance(0, "llama-3.1-8b", long.gpus))
    assert policy.place(request(prompt_tokens=200, rid=1), view) == Route(0)


def test_routes_to_an_existing_instance_with_room() -> None:
    view = FakeView()
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), running=2))
    for name in POLICIES:
        assert make_policy_for(name).place(request(), view) == Route(0), name


# -- vllm-autoscale ----------------------------------------------------------------------------------


@pytest.mark.parametrize("busy_extra,stopped", [(False, {0}), (True, {0, 1})])
def test_vllm_autoscale_scales_in_idle_instances_but_keeps_one_per_model(busy_extra: bool,
                                                                        stopped: set[int]) -> None:
    view = FakeView(now_s=500.0)
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), last_busy_s=100.0))
    view.add(FakeInstance(1, "llama-3.1-8b", (1,), last_busy_s=200.0))
    view.add(FakeInstance(2, "mistral-7b", (2,), last_busy_s=100.0))  # a model's only instance: kept
    if busy_extra:
        view.add(FakeInstance(3, "llama-3.1-8b", (3,), running=2, last_busy_s=500.0))
    plan = make_policy_for("vllm-autoscale", keep_alive_s=60.0).scale(view)
    assert {a.instance_id for a in plan.actions if isinstance(a, StopInstance)} == stopped
    assert not any(isinstance(a, StopInstance) for a in make_policy_for("vllm").scale(view).actions)


def test_vllm_autoscale_keeps_an_instance_within_the_keep_alive() -> None:
    view = FakeView(now_s=500.0)
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), last_busy_s=450.0))
    view.add(FakeInstance(1, "llama-3.1-8b", (1,), last_busy_s=100.0))
    plan = make_policy_for("vllm-autoscale", keep_alive_s=60.0).scale(view)
    assert [a for a in plan.actions if isinstance(a, StopInstance)] == [StopInstance(1)]


# -- the planning headroom every policy shares -------------------------------------------------------


def _queued_for_share_of_ttft(lo: float, hi: float) -> int:
    """Queued prompts of 1024 tokens ahead of a 512-token request that take its prefill to between
    ``lo`` and ``hi`` of its TTFT SLO on a whole GPU at max clock."""
    model, clock = "llama-3.1-8b", STORE.gpu(GPU).max_clock_mhz
    slo_s = make_slo(model).ttft_for(512)
    for waiting in range(64):
        share = prefill_time_s(STORE, GPU, model, waiting * 1024 + 512, 100.0, clock) / slo_s
        if lo < share < hi:
            return waiting
    raise AssertionError("no queue length in range")


@pytest.mark.parametrize("name", POLICIES)
def test_every_baseline_plans_ttft_at_the_shared_headroom(name: str) -> None:
    assert TTFT_PLANNING == 1.0 and TBT_PLANNING == 0.8
    waiting = _queued_for_share_of_ttft(TBT_PLANNING + 0.02, TTFT_PLANNING - 0.02)
    view = FakeView()
    view.add(FakeInstance(0, "llama-3.1-8b", (0,), waiting=waiting))
    # Its prefill within the TTFT SLO but past 80% of it: it still has room.
    assert make_policy_for(name).place(request(prompt_tokens=512), view) == Route(0)
    full = FakeView()
    full.add(FakeInstance(0, "llama-3.1-8b", (0,), waiting=_queued_for_share_of_ttft(1.05, 2.0)))
    assert isinstance(make_policy_for(name).place(request(prompt_tokens=512), full), StartInstance)


@pytest.mark.parametrize("name", POLICIES)
def test_every_baseline_plans_tbt_at_the_shared_headroom(name: str) -> None:
    model, clock = "llama-3.1-8b", STORE.gpu(GPU).max_clock_mhz
    tbt_slo_s = make_slo(model).tbt_s

    def view_with(running: int) -> FakeView:
        view = FakeView()
        view.add(FakeInstance(0, model, (0,), running=running))
        return view

    def share(running: int) -> float:
        view = view_with(running)
        return predicted_tbt_s(STORE, GPU, view.instance(0), clock, context_tokens=512) / tbt_slo_s

    over = next(r for r in range(1, 1024) if share(r) > TBT_PLANNING + 0.01)
    assert share(over) < 1.0  # past the headroom, within the SLO
    assert isinstance(make_policy_for(name).place(request(prompt_tokens=64), view_with(over)), StartInstance)


# -- rates known in advance ----------------------------------------------------------------------


def test_experiment_gives_policies_each_models_mean_rate_and_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    requests = [request("llama-3.1-8b", prompt_tokens=100, output_tokens=10, rid=0, arrival_s=10.0),
                request("llama-3.1-8b", prompt_tokens=300, output_tokens=30, rid=1, arrival_s=20.0),
                request("mistral-7b", prompt_tokens=50, output_tokens=5, rid=2, arrival_s=30.0)]
    contexts: list[PolicyContext] = []

    def recording(name: str, context: PolicyContext) -> Policy:
        contexts.append(context)
        return make_policy(name, context)

    monkeypatch.setattr(experiment_module, "make_policy", recording)
    experiment = Experiment(requests, slos_for(MODELS), ClusterConfig(nodes=1, gpus_per_node=8), keep_alive_s=60.0)
    experiment.run(STORE, "vllm")
    (context,) = contexts
    assert context.known_rates_per_s == {"llama-3.1-8b": 2 / 20.0, "mistral-7b": 1 / 20.0}
    assert context.known_lengths == {"llama-3.1-8b": (200.0, 20.0), "mistral-7b": (50.0, 5.0)}
