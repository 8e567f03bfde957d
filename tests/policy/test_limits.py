"""The catalogue's per-model bounds over any policy's decisions: min kept, max not exceeded, keep-alive per model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.policy.limits import limit_placement, limit_plan, upkeep
from festina_hpc.policy.types import (
    Drop,
    InstancePhase,
    Migrate,
    ModelLimits,
    Plan,
    Route,
    StartInstance,
    StopInstance,
)
from festina_hpc.sim.simulator import Simulation
from tests.policy.conftest import (
    STORE,
    FakeInstance,
    FakeView,
    bursts,
    make_policy_for,
    request,
    simulation,
    slos_for,
)

M = "llama-3.1-8b"
OTHER = "mistral-7b"


def bounded_view(now_s: float = 1000.0, **limits: object) -> FakeView:
    view = FakeView(nodes=1, gpus_per_node=4, now_s=now_s, models=(M, OTHER))
    view._models[M] = replace(view.model(M), limits=ModelLimits(**limits))  # type: ignore[arg-type]
    return view


def test_no_bounds_leave_every_decision_as_it_is() -> None:
    view = FakeView(nodes=1, gpus_per_node=4, models=(M,))
    view.add(FakeInstance(1, M, (0,)))
    start = StartInstance(M, (1,))
    assert limit_placement(start, view) == (start, None)
    plan = Plan((start, StopInstance(1)), "scale")
    assert limit_plan(plan, view).plan is plan
    assert not upkeep(view).plan


def test_a_start_past_max_routes_to_the_least_loaded_instance() -> None:
    view = bounded_view(max_instances=2)
    view.add(FakeInstance(1, M, (0,), running=9))
    view.add(FakeInstance(2, M, (1,), running=3))
    placement, refusal = limit_placement(StartInstance(M, (2,)), view)
    assert placement == Route(2)
    assert refusal is not None and "max_instances = 2" in refusal.reason


def test_a_start_below_max_passes_and_draining_instances_do_not_count() -> None:
    view = bounded_view(max_instances=2)
    view.add(FakeInstance(1, M, (0,)))
    view.add(FakeInstance(2, M, (1,), phase=InstancePhase.DRAINING))
    start = StartInstance(M, (2,))
    assert limit_placement(start, view) == (start, None)


def test_a_start_that_replaces_an_evicted_instance_is_within_max() -> None:
    view = bounded_view(max_instances=1)
    view.add(FakeInstance(1, M, (0,)))
    assert limit_placement(StartInstance(M, (1,), evict=(1,)), view)[1] is None
    assert limit_placement(StartInstance(M, (1,)), view)[0] == Route(1)


def test_a_plan_starts_no_more_than_max() -> None:
    view = bounded_view(max_instances=2)
    view.add(FakeInstance(1, M, (0,)))
    plan = Plan((StartInstance(M, (1,)), StartInstance(M, (2,)), StartInstance(OTHER, (3,))), "scale")
    limited = limit_plan(plan, view)
    assert limited.plan == Plan((StartInstance(M, (1,)), StartInstance(OTHER, (3,))), "scale")
    assert [r.decision for r in limited.refused] == [StartInstance(M, (2,))]


@pytest.mark.parametrize(("case", "phase", "idle_for_s", "kept"), [
    ("the minimum is kept even when idle for long", InstancePhase.READY, 10_000.0, [1, 2]),
])
def test_stops_never_go_below_min(case: str, phase: InstancePhase, idle_for_s: float, kept: list[int]) -> None:
    view = bounded_view(min_instances=2)
    for i in (1, 2, 3):
        view.add(FakeInstance(i, M, (i - 1,), phase=phase, last_busy_s=view.now_s - idle_for_s))
    limited = limit_plan(Plan(tuple(StopInstance(i) for i in (3, 2, 1)), "scale to zero"), view)
    assert limited.plan.actions == (StopInstance(3),), case
    assert sorted(r.decision.instance_id for r in limited.refused) == kept  # type: ignore[union-attr]
    assert all("min_instances = 2" in r.reason for r in limited.refused)


def test_migrations_pass_the_bounds() -> None:
    view = bounded_view(min_instances=1, max_instances=1)
    view.add(FakeInstance(1, M, (0,)))
    plan = Plan((Migrate(1, (3,)),), "evacuate")
    assert limit_plan(plan, view).plan is plan


def test_an_eviction_below_min_is_refused() -> None:
    view = bounded_view(min_instances=1)
    view.add(FakeInstance(1, M, (0,)))
    placement, refusal = limit_placement(StartInstance(OTHER, (0,), evict=(1,)), view)
    assert isinstance(placement, Drop) and "min_instances = 1" in placement.reason
    assert refusal is not None


def test_upkeep_starts_the_missing_minimum_on_free_gpus() -> None:
    view = bounded_view(min_instances=3)
    view.add(FakeInstance(1, M, (0,)))
    kept = upkeep(view)
    assert kept.plan.actions == (StartInstance(M, (1,)), StartInstance(M, (2,)))
    assert "min_instances = 3" in kept.plan.reason and not kept.unmet


def test_upkeep_says_when_the_minimum_has_no_room() -> None:
    view = bounded_view(min_instances=2)
    for g in range(4):
        view.add(FakeInstance(10 + g, OTHER, (g,)))
    kept = upkeep(view)
    assert not kept.plan and kept.unmet and "no 1 free GPU" in kept.unmet[0]


def test_keep_alive_per_model_stops_after_its_own_idle_time() -> None:
    view = bounded_view(keep_alive_s=30.0, min_instances=1)
    view.add(FakeInstance(1, M, (0,), last_busy_s=view.now_s - 31))
    view.add(FakeInstance(2, M, (1,), last_busy_s=view.now_s - 40))
    assert upkeep(view).plan.actions == (StopInstance(2),)  # the newest goes; min keeps one
    view.instance(1).last_busy_s = view.now_s - 5
    assert not upkeep(view).plan  # one busy 5 s ago: not idle for the keep-alive yet


def test_keep_alive_per_model_holds_off_a_policys_earlier_scale_to_zero() -> None:
    view = bounded_view(keep_alive_s=600.0)
    view.add(FakeInstance(1, M, (0,), last_busy_s=view.now_s - 100))
    view.add(FakeInstance(2, M, (1,), last_busy_s=view.now_s - 100))
    # serverlessllm stops every instance idle past the global keep-alive (60 s here)
    plan = make_policy_for("serverlessllm", keep_alive_s=60.0).scale(view)
    assert {a.instance_id for a in plan.actions if isinstance(a, StopInstance)} == {1, 2}
    limited = limit_plan(plan, view)
    assert [a for a in limited.plan.actions if isinstance(a, StopInstance)] == [StopInstance(1)] \
        or [a for a in limited.plan.actions if isinstance(a, StopInstance)] == [StopInstance(2)]
    assert len(limited.refused) == 1 and "keep_alive_s = 600" in limited.refused[0].reason
    view.now_s += 600
    assert not limit_plan(plan, view).refused


def test_a_policy_placement_is_limited_end_to_end() -> None:
    view = bounded_view(max_instances=1)
    view.add(FakeInstance(1, M, (0,), running=256, waiting=50))  # full: any policy starts another
    placement = make_policy_for("vllm").place(request(M), view)
    assert isinstance(placement, StartInstance)
    assert limit_placement(placement, view)[0] == Route(1)


def test_the_simulator_applies_the_same_bounds() -> None:
    rng = np.random.default_rng(7)
    requests = bursts(rng, {M: 4.0}, burst_s=30.0, gap_s=600.0, count=2)
    policy = "serverlessllm"  # scales to zero after 60 s idle, so each burst cold-starts without bounds
    free = simulation(policy, requests).run()
    assert free.cold_starts >= 2
    cluster = ClusterConfig(nodes=1, gpus_per_node=8)
    sim = Simulation(cluster, STORE, make_policy_for(policy), requests, slos_for({M}),
                     limits={M: ModelLimits(min_instances=1, max_instances=1)})
    kept = sim.run()
    assert kept.cold_starts == 1 and kept.invalid_decisions == 0  # one kept through the gap, never a second
    assert kept.requests_completed == len(requests)
