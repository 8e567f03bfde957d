"""Behaviours of the ``festina`` policy, pinned through its public steps and the simulator.

Everything runs on the shipped H100 profiles with the default SLOs
(``default_slo``: 5x the unloaded latency). Unit tests hand-build a cluster in
a ``FakeView`` and call ``place``, ``control``, ``solve`` or ``consolidate``;
the others run ``Simulation`` on a small seeded workload, some from a state
built by starting instances directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import pytest

from festina_hpc.policy.festina import SCALE_OUT_AFTER_S, FestinaPolicy, Load
from festina_hpc.policy.types import Migrate, NodePower, Request, Route, Slo, StartInstance
from festina_hpc.sim.cluster import ClusterConfig, SimInstance
from festina_hpc.sim.engine import Event
from festina_hpc.sim.simulator import Simulation
from festina_hpc.sim.workload import DEFAULT_MODEL_MIX, default_slo
from tests.policy.conftest import GPU, STORE, FakeInstance, FakeView, make_policy_for, poisson_requests

MODEL = "llama-3.1-8b"
SLOS: dict[str, Slo] = {m: default_slo(STORE, GPU, m) for m in DEFAULT_MODEL_MIX}
MAX_CLOCK_MHZ = STORE.gpu(GPU).max_clock_mhz
MIN_TABLE_CLOCK_MHZ = min(STORE.gpu(GPU).table_clocks_mhz)


def festina(name: str = "festina") -> FestinaPolicy:
    policy = make_policy_for(name)
    assert isinstance(policy, FestinaPolicy)
    return policy


def fake_view(nodes: int = 1, models: Iterable[str] = (MODEL,)) -> FakeView:
    return FakeView(nodes=nodes, models=models, slos=SLOS)


def load_of(inst: FakeInstance, instance_id: int | None = None) -> Load:
    """What the controller plans for ``inst`` (as ``control`` builds it)."""
    load = festina().load_of(inst)
    return load if instance_id is None else dataclasses.replace(load, instance_id=instance_id)


def request(rid: int, model: str = MODEL) -> Request:
    return Request(rid, 0.0, model, 512, 128)


# -- local control ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["llama-3.1-8b", "mistral-7b", "llama-2-13b"])
def test_a_decode_only_gpu_runs_a_lower_clock_than_during_a_prefill_burst(model: str) -> None:
    view = fake_view(models=[model])
    inst = view.add(FakeInstance(0, model, (0,), running=32, arrival_rate_per_s=1.0))
    policy = festina()
    decode_only = policy.solve(view, [load_of(inst)])
    settings = policy.control(view.gpu(0), view)  # the GPU is at its max clock
    inst.waiting = 64
    burst = policy.solve(view, [load_of(inst)])
    burst_settings = policy.control(view.gpu(0), view)

    assert decode_only is not None and burst is not None
    assert decode_only.clock_mhz < burst.clock_mhz
    assert settings is not None and settings.clock_mhz is not None
    burst_clock = view.gpu(0).clock_mhz if burst_settings is None else burst_settings.clock_mhz
    assert burst_clock is not None and settings.clock_mhz < burst_clock


def test_a_prefill_burst_raises_a_slowed_gpus_clock_within_one_tick() -> None:
    view = fake_view()
    inst = view.add(FakeInstance(0, MODEL, (0,), running=32, arrival_rate_per_s=1.0))
    policy = festina()
    decode_only = policy.solve(view, [load_of(inst)])
    assert decode_only is not None and decode_only.clock_mhz < MAX_CLOCK_MHZ
    view.gpu(0).clock_mhz = decode_only.clock_mhz  # where decode-only traffic left it
    steady = policy.control(view.gpu(0), view)
    assert steady is None or steady.clock_mhz == decode_only.clock_mhz
    inst.waiting = 64
    settings = policy.control(view.gpu(0), view)
    assert settings is not None and settings.clock_mhz is not None and settings.clock_mhz > decode_only.clock_mhz


def test_the_planned_clock_never_falls_as_the_queue_grows() -> None:
    view = fake_view()
    policy = festina()
    clocks = []
    for waiting in (0, 2, 4, 8, 16, 24, 32, 64, 96, 128):
        solved = policy.solve(view, [Load(0, MODEL, 32 + waiting, (waiting + 1) * 1024, 1.0)])
        clocks.append(MAX_CLOCK_MHZ if solved is None else solved.clock_mhz)  # control() runs flat out when None
    assert clocks == sorted(clocks)


# -- co-location in the simulator ------------------------------------------------------------------------


class CheckedSimulation(Simulation):
    """Checks after every event that no GPU is over-committed and its books match its instances."""

    max_instances_per_gpu = 0

    def _handle(self, e: Event) -> Iterable[Event]:
        events = list(super()._handle(e))
        usable = self.spec.memory_bytes * self.config.usable_memory_frac
        for gpu in self.gpu_list:
            residents = [self.live[i] for i in gpu.instances]
            assert gpu.memory_fraction_allocated <= 1 + 1e-9, (gpu.id, gpu.memory_fraction_allocated)
            assert gpu.sm_pct_allocated <= 100 + 1e-9, (gpu.id, gpu.sm_pct_allocated)
            assert gpu.memory_fraction_allocated == pytest.approx(sum(i.memory_fraction for i in residents))
            assert gpu.sm_pct_allocated == pytest.approx(sum(i.sm_pct for i in residents))
            weights = sum(i.info.weights_bytes_per_gpu for i in residents)
            kv = sum(i.kv_tokens_reserved * i.info.kv_bytes_per_token_per_gpu for i in residents)
            # A lone request too big for its cache is admitted anyway (vLLM truncates it): not counted.
            kv_single = sum(i.kv_tokens_reserved * i.info.kv_bytes_per_token_per_gpu for i in residents
                            if i.running <= 1 and i.kv_tokens_reserved > i.kv_capacity_tokens)
            assert weights + kv - kv_single <= usable * gpu.memory_fraction_allocated + 1e-6, gpu.id
            self.max_instances_per_gpu = max(self.max_instances_per_gpu, len(residents))
        return events


def run_checked(models: Sequence[str], rate_per_s: float, duration_s: float, seed: int = 0,
                gpus: int = 4, policy: str = "festina") -> tuple[CheckedSimulation, list[Request]]:
    requests = poisson_requests(np.random.default_rng(seed), {m: rate_per_s for m in models}, duration_s,
                                prompt_tokens=(64, 2048), output_tokens=(8, 512))
    sim = CheckedSimulation(ClusterConfig(nodes=1, gpus_per_node=gpus), STORE, festina(policy), requests,
                            {m: SLOS[m] for m in models})
    return sim, requests


@pytest.mark.parametrize("policy", ["festina", "festina-control", "festina-placement"])
@pytest.mark.parametrize("models", [4, 6, 8])
def test_co_located_models_never_exceed_memory_or_sm_shares(policy: str, models: int) -> None:
    sim, requests = run_checked(DEFAULT_MODEL_MIX[:models], rate_per_s=1.0, duration_s=90.0, policy=policy)
    result = sim.run()
    assert result.invalid_decisions == 0
    assert result.requests_completed + result.requests_dropped == result.requests_total == len(requests)
    assert result.requests_completed > 0


SMALL_MODELS = [m for m in DEFAULT_MODEL_MIX if STORE.model(m).tp_on(GPU) == 1]  # five of them


def test_models_outnumbering_gpus_share_them_rather_than_being_dropped() -> None:
    sim, _ = run_checked(SMALL_MODELS, rate_per_s=0.2, duration_s=120.0)
    result = sim.run()
    assert sim.max_instances_per_gpu >= 2
    assert "no capacity for a new instance" not in result.drop_reasons, result.drop_reasons


# -- consolidation ---------------------------------------------------------------------------------------


def two_node_view(resident: FakeInstance) -> FakeView:
    """Node 0: seven busy instances on whole GPUs and ``resident`` on half of GPU 7; node 1: one light
    instance on half of GPU 8, the least-loaded node, which fits nowhere but beside ``resident``."""
    view = fake_view(nodes=2)
    for g in range(7):
        view.add(FakeInstance(g, MODEL, (g,), running=16, arrival_rate_per_s=1.0))
    view.add(resident)
    view.add(FakeInstance(8, MODEL, (8,), sm_pct=50, memory_fraction=0.5, running=8, arrival_rate_per_s=0.5))
    return view


def test_a_consolidation_that_would_push_a_co_resident_past_its_slo_is_rejected() -> None:
    heavy = FakeInstance(7, MODEL, (7,), sm_pct=50, memory_fraction=0.5, running=116, waiting=4,
                         arrival_rate_per_s=2.0)
    view = two_node_view(heavy)
    policy = festina()
    moved = load_of(view.instance(8), instance_id=-9)
    assert policy.solve(view, [load_of(heavy)]) is not None  # it keeps its SLO alone
    assert policy.solve(view, [load_of(heavy), moved]) is None  # not with the newcomer
    plan = policy.consolidate(view)
    assert not any(isinstance(a, Migrate) for a in plan.actions), plan


def test_a_consolidation_that_keeps_every_slo_moves_the_least_loaded_node() -> None:
    light = FakeInstance(7, MODEL, (7,), sm_pct=50, memory_fraction=0.5, running=8, arrival_rate_per_s=0.5)
    plan = festina().consolidate(two_node_view(light))
    assert [(a.instance_id, a.gpus, a.memory_fraction) for a in plan.actions if isinstance(a, Migrate)] == [
        (8, (7,), 0.5)]
    assert len(plan.actions) == 1


def ready_instance(sim: Simulation, model: str, gpus: tuple[int, ...], memory_fraction: float) -> SimInstance:
    inst, _ = sim._start(StartInstance(model, gpus, sm_pct=100.0, memory_fraction=memory_fraction))
    sim._instance_ready(inst)
    return inst


def evacuation_run(node0_memory_fraction: float) -> tuple[Simulation, list[Request]]:
    """Two nodes: node 0 serves two instances, node 1 one on half of GPU 8; light traffic for 700 s
    (an emptied node goes off only after a node wake time)."""
    requests = poisson_requests(np.random.default_rng(0), {MODEL: 0.5}, 700.0)
    sim = CheckedSimulation(ClusterConfig(nodes=2, gpus_per_node=8), STORE, festina(), requests, {MODEL: SLOS[MODEL]})
    ready_instance(sim, MODEL, (0,), node0_memory_fraction)
    ready_instance(sim, MODEL, (1,), node0_memory_fraction)
    ready_instance(sim, MODEL, (8,), 0.5)
    return sim, requests


def test_an_evacuated_node_is_powered_off_in_the_simulator() -> None:
    sim, requests = evacuation_run(node0_memory_fraction=1.0)  # only node 0's empty GPUs have room
    result = sim.run()
    assert result.migrations >= 1 and result.invalid_decisions == 0
    assert sim.node(1).power is NodePower.OFF
    assert all(inst.node == 0 for inst in sim.instances())
    assert result.requests_completed + result.requests_dropped == len(requests)


def test_an_evacuation_onto_a_half_used_gpu_is_carried_out() -> None:
    sim, _ = evacuation_run(node0_memory_fraction=0.5)  # GPU 0 has the memory room, fullest first
    result = sim.run()
    assert result.invalid_decisions == 0
    assert result.migrations >= 1 and sim.node(1).power is NodePower.OFF


# -- placement -------------------------------------------------------------------------------------------


def overloaded(instance_id: int) -> FakeInstance:
    return FakeInstance(instance_id, MODEL, (instance_id,), running=64, waiting=200, arrival_rate_per_s=4.0)


def light(instance_id: int) -> FakeInstance:
    return FakeInstance(instance_id, MODEL, (instance_id,), running=4, arrival_rate_per_s=0.5)


def test_an_overloaded_instance_has_no_settings_that_keep_its_slo() -> None:
    """The premise of the placement tests: the overloaded instance is unsafe at any clock and share."""
    view = fake_view()
    inst = view.add(overloaded(0))
    assert festina().solve(view, [load_of(inst)]) is None


@pytest.mark.parametrize("light_first", [True, False])
def test_placement_routes_to_the_safe_instance_not_the_overloaded_one(light_first: bool) -> None:
    view = fake_view(nodes=2)
    safe = view.add(light(0 if light_first else 1))
    view.add(overloaded(1 if light_first else 0))
    remembering = festina()  # one policy throughout: its fill target carries over
    for rid in range(32):
        assert festina().place(request(rid), view) == Route(safe.id), rid
        assert remembering.place(request(rid), view) == Route(safe.id), rid


@pytest.mark.parametrize("spare_gpus", [True, False])
def test_placement_finds_the_one_safe_instance_among_many_overloaded(spare_gpus: bool) -> None:
    """Six overloaded instances and a light one in the middle; a fresh policy per request (no fill target)."""
    view = fake_view(nodes=2 if spare_gpus else 1, models=(MODEL, "mistral-7b"))
    for i in range(7):
        view.add(light(i) if i == 3 else overloaded(i))
    if not spare_gpus:
        view.add(FakeInstance(7, "mistral-7b", (7,)))  # every GPU taken: nowhere to start
    decisions = [festina().place(request(rid), view) for rid in range(32)]
    assert decisions == [Route(3)] * 32


def test_placement_does_not_call_an_instance_safe_because_full_speed_is_the_best_it_can_do() -> None:
    """A queue no setting can clear within the TTFT SLO is not safe for a new request: with free
    GPUs and a queue that still beats a cold start, the request waits there but the model is
    marked short, so scale() starts the missing instance once the shortage has lasted
    SCALE_OUT_AFTER_S (a moment's shortage starts nothing)."""
    view = fake_view()
    queued = view.add(FakeInstance(0, MODEL, (0,), running=8, waiting=12, arrival_rate_per_s=2.0))
    policy = festina()
    assert policy.place(request(0), view) == Route(queued.id)
    assert not policy.scale(view).actions
    started = _scale_while_short(policy, view)
    assert [a.model for a in started] == [MODEL]
    assert started[0].gpus != queued.gpus


def test_a_shortage_that_passes_starts_no_instance() -> None:
    view = fake_view()
    queued = view.add(FakeInstance(0, MODEL, (0,), running=8, waiting=12, arrival_rate_per_s=2.0))
    policy = festina()
    policy.place(request(0), view)
    assert not policy.scale(view).actions
    queued.running, queued.waiting, queued.arrival_rate_per_s = 2, 0, 0.2  # the burst is served
    view.now_s += SCALE_OUT_AFTER_S
    assert not policy.scale(view).actions
    queued.running, queued.waiting, queued.arrival_rate_per_s = 8, 12, 2.0  # a new one starts the clock again
    policy.place(request(1), view)
    view.now_s += SCALE_OUT_AFTER_S / 2
    assert not policy.scale(view).actions


def _scale_while_short(policy: FestinaPolicy, view: FakeView) -> list[StartInstance]:
    """What scale() starts after SCALE_OUT_AFTER_S more of the same shortage (a request placed
    before each tick finds no safe instance)."""
    policy.scale(view)
    view.now_s += SCALE_OUT_AFTER_S
    policy.place(request(1), view)
    return [a for a in policy.scale(view).actions if isinstance(a, StartInstance)]


def test_a_model_short_of_capacity_on_a_full_cluster_takes_an_idle_instance_of_a_model_with_room() -> None:
    """Every GPU taken: MODEL's six instances keep missing while mistral-7b has a lightly loaded
    instance and an idle one. The idle one is evicted for a new MODEL instance on its GPU, but
    never mistral-7b's last instance with room."""
    view = fake_view(models=(MODEL, "mistral-7b"))
    for g in range(6):
        view.add(FakeInstance(g, MODEL, (g,), running=8, waiting=12, arrival_rate_per_s=2.0))
    view.add(FakeInstance(6, "mistral-7b", (6,), running=2, arrival_rate_per_s=0.2))
    idle = view.add(FakeInstance(7, "mistral-7b", (7,)))
    policy = festina()
    policy.place(request(0), view)
    starts = _scale_while_short(policy, view)
    assert starts == [StartInstance(MODEL, (7,), sm_pct=100.0, memory_fraction=starts[0].memory_fraction,
                                    evict=(idle.id,))]

    view = fake_view(models=(MODEL, "mistral-7b"))
    for g in range(7):
        view.add(FakeInstance(g, MODEL, (g,), running=8, waiting=12, arrival_rate_per_s=2.0))
    view.add(FakeInstance(7, "mistral-7b", (7,)))  # idle, but mistral-7b's only instance
    policy = festina()
    policy.place(request(0), view)
    assert not _scale_while_short(policy, view)
