"""The simulator's handling of plan actions and settings that the baselines rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from festina_hpc.policy.base import PolicyContext
from festina_hpc.policy.baselines.vllm import VllmPolicy
from festina_hpc.policy.types import (
    Action,
    ClusterView,
    GpuSettings,
    InstancePhase,
    MoveQueued,
    Plan,
    Request,
    StartInstance,
)
from festina_hpc.sim.cluster import RequestRecord, SimInstance
from festina_hpc.sim.simulator import Simulation
from tests.policy.conftest import GPU, STORE, poisson_requests, request, simulate, simulation


def _ready(sim: Simulation, decision: StartInstance) -> SimInstance:
    inst, _ = sim._start(decision)
    sim._instance_ready(inst)
    return inst


def _queue(inst: SimInstance, ids: range) -> None:
    inst.queue.extend(RequestRecord(request(rid=i)) for i in ids)


def test_move_queued_takes_the_latest_arrivals_in_order() -> None:
    sim = simulation("vllm", [request()])
    source = _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    target, _ = sim._start(StartInstance("llama-3.1-8b", (1,)))  # still loading: nothing is admitted yet
    _queue(source, range(1, 6))
    sim._apply(MoveQueued(source.id, target.id, 2))
    assert [r.request.id for r in source.queue] == [1, 2, 3]
    assert [r.request.id for r in target.queue] == [4, 5]
    assert sim.request_migrations == 2
    sim._apply(MoveQueued(source.id, target.id, 10))  # as many as there are
    assert not source.queue and sim.request_migrations == 5


def test_pending_prompt_tokens_follow_the_queue_and_the_prefills_as_they_move() -> None:
    """The instance keeps its queued and prefilling prompt tokens as a running sum (placement reads
    it for every candidate): it matches the sum over its requests after every kind of change."""
    sim = simulation("vllm", [request()])
    inst = _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    other = _ready(sim, StartInstance("llama-3.1-8b", (1,)))

    def counted(i: SimInstance) -> int:
        return sum(r.request.prompt_tokens for r in i.queue) + sum(left for _, left in i.prefill_queue)

    inst.queue.extend(RequestRecord(request(rid=i, prompt_tokens=100 * i)) for i in range(1, 9))
    inst.queue.appendleft(RequestRecord(request(rid=9, prompt_tokens=7)))
    inst.queue.pop()
    inst.queue.popleft()
    sim._apply(MoveQueued(inst.id, other.id, 2))
    assert inst.pending_prompt_tokens == counted(inst) == 100 + 200 + 300 + 400 + 500
    inst.admit()
    inst.chunk = inst.take_chunk(250)
    inst.finish_chunk()
    assert inst.pending_prompt_tokens == counted(inst) == 1500 - 250
    other.queue.extend(inst.take_queue())
    assert inst.pending_prompt_tokens == counted(inst) and other.pending_prompt_tokens == counted(other)


def test_move_queued_starts_an_idle_target() -> None:
    sim = simulation("vllm", [request()])
    source, _ = sim._start(StartInstance("llama-3.1-8b", (0,)))
    target = _ready(sim, StartInstance("llama-3.1-8b", (1,)))
    _queue(source, range(1, 4))
    events = sim._apply(MoveQueued(source.id, target.id, 3))
    assert events and target.running == 3 and not target.queue


class BadMoves(VllmPolicy):
    """vllm that, once its instance serves, asks for moves the simulator must refuse."""

    name = "bad-moves"
    consolidate_period_s = 5.0

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.asked = False

    def consolidate(self, view: ClusterView) -> Plan:
        ready = [i for i in view.instances() if i.phase is InstancePhase.READY]
        if self.asked or len({i.model for i in ready}) < 2:
            return Plan()
        self.asked = True
        first_of = {i.model: i for i in reversed(sorted(ready, key=lambda i: i.id))}
        a, b = (first_of[m] for m in sorted(first_of)[:2])  # two instances of different models
        bad: tuple[Action, ...] = (MoveQueued(a.id, 999, 1), MoveQueued(a.id, a.id, 1), MoveQueued(a.id, b.id, 1),
                                   MoveQueued(999, a.id, 1), MoveQueued(a.id, a.id + 1000, 0))
        return Plan(bad)


def test_invalid_moves_are_counted_and_change_nothing() -> None:
    rates = {"llama-3.1-8b": 1.0, "mistral-7b": 1.0}
    workload = poisson_requests(np.random.default_rng(3), rates, duration_s=60.0)
    policy = BadMoves(PolicyContext(STORE, GPU))
    result = simulate(policy, workload)
    assert policy.asked
    assert result.invalid_decisions == 5
    assert result.request_migrations == 0
    assert result.requests_completed == len(workload)


def test_eviction_frees_an_idle_instances_gpu_for_the_start() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=1, models=["mistral-7b"])
    idle = _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    inst, _ = sim._start(StartInstance("mistral-7b", (0,), evict=(idle.id,)))
    assert idle.id not in sim.live and sim.gpu(0).instances == [inst.id]
    assert sim.gpu(0).sm_pct_allocated == 100.0 and sim.gpu(0).memory_fraction_allocated == 1.0


@pytest.mark.parametrize("make_busy", [True, False])
def test_eviction_of_a_busy_instance_or_without_room_is_refused_whole(make_busy: bool) -> None:
    sim = simulation("vllm", [request()], gpus_per_node=2, models=["mistral-7b"])
    victim = _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    blocker = _ready(sim, StartInstance("llama-3.1-8b", (1,)))
    if make_busy:
        _queue(victim, range(1, 2))
        decision = StartInstance("mistral-7b", (0,), evict=(victim.id,))
    else:  # the victim frees GPU 0, but the start asks for GPU 1
        decision = StartInstance("mistral-7b", (1,), evict=(victim.id,))
    sim._execute(Plan((decision,)))
    assert sim.invalid_decisions == 1
    assert victim.id in sim.live and blocker.id in sim.live
    assert sim.gpu(0).instances == [victim.id]


def test_a_loading_instance_stopped_after_a_share_change_frees_it() -> None:
    sim = simulation("vllm", [request()], live_share_change=True)
    inst, _ = sim._start(StartInstance("llama-3.1-8b", (0,), sm_pct=40.0, memory_fraction=0.5))
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={inst.id: 60.0}))
    assert inst.sm_pct == 60.0 and sim.gpu(0).sm_pct_allocated == 60.0
    sim._stop(inst)
    assert sim.gpu(0).sm_pct_allocated == 0.0 and 0 in sim.free_gpus()


def test_settings_may_move_sms_from_one_instance_to_another() -> None:
    sim = simulation("vllm", [request()], models=["mistral-7b"], live_share_change=True)
    a = _ready(sim, StartInstance("llama-3.1-8b", (0,), sm_pct=60.0, memory_fraction=0.4))
    b = _ready(sim, StartInstance("mistral-7b", (0,), sm_pct=40.0, memory_fraction=0.4))
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={b.id: 70.0, a.id: 30.0}))  # the grow comes first
    assert (a.sm_pct, b.sm_pct, sim.invalid_decisions) == (30.0, 70.0, 0)
    assert sim.gpu(0).sm_pct_allocated == 100.0


@pytest.mark.parametrize("live_share_change", [True, False])  # changed in place or by a restart
def test_a_tensor_parallel_share_must_fit_every_gpu_it_spans(live_share_change: bool) -> None:
    sim = simulation("vllm", [request()], models=["codellama-34b", "mistral-7b"], live_share_change=live_share_change)
    tp = _ready(sim, StartInstance("codellama-34b", (0, 1), sm_pct=50.0, memory_fraction=0.6))
    _ready(sim, StartInstance("mistral-7b", (1,), sm_pct=50.0, memory_fraction=0.3))
    sim._apply_settings(sim.gpu(0), GpuSettings(sm_pct={tp.id: 80.0}))  # room on GPU 0, none on GPU 1
    assert sim.invalid_decisions == 1 and tp.sm_pct == 50.0 and sim.share_restarts == 0
    assert sim.gpu(1).sm_pct_allocated == 100.0


def test_measured_window_ends_with_the_last_request_whatever_the_tick_periods() -> None:
    workload = poisson_requests(np.random.default_rng(4), {"llama-3.1-8b": 1.0}, duration_s=60.0)

    class SlowTicks(VllmPolicy):
        name = "slow-ticks"
        scale_period_s = 300.0
        consolidate_period_s = 900.0

    sim = simulation("vllm", workload)
    fast = sim.run()
    slow = simulate(SlowTicks(PolicyContext(STORE, GPU)), workload)
    assert fast.sim_time_s == max(rec.finish_s for rec in sim.records)
    assert slow.sim_time_s == fast.sim_time_s
    assert slow.energy_j == pytest.approx(fast.energy_j)


@pytest.mark.parametrize("chunk_tokens", [2048, 512])
def test_a_prefill_chunk_setting_splits_a_long_prompt_into_that_many_steps(chunk_tokens: int) -> None:
    sim = simulation("vllm", [request()], gpus_per_node=1)
    inst = _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    sim._apply_settings(sim.gpu(0), GpuSettings(chunk_tokens={inst.id: chunk_tokens}))
    assert inst.chunk_tokens == chunk_tokens and sim.invalid_decisions == 0
    record = RequestRecord(Request(99, 0.0, "llama-3.1-8b", 4096, 2))
    inst.queue.append(record)
    steps = 0
    events = sim._next_step(inst)
    while math.isnan(record.first_token_s):  # until the prefill completes
        steps += 1
        sim._now = events[0].time_s
        events = sim._step_done(inst)
    assert steps == 4096 // chunk_tokens
    table = STORE.table(GPU, "llama-3.1-8b")
    one_chunk_s = table.lookup("prefill", 1, chunk_tokens, 100, 1980).latency_s
    assert record.first_token_s == pytest.approx(steps * one_chunk_s)
