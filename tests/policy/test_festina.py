"""Behaviours of the ``festina`` policy, pinned through its public steps and the simulator.

Everything runs on the shipped H100 profiles with the default SLOs
(``default_slo``: 5x the unloaded latency). Unit tests hand-build a cluster in
a ``FakeView`` and call ``place``, ``control``, ``solve`` or ``consolidate``;
the others run ``Simulation`` on a small seeded workload, some from a state
built by starting instances directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pytest

from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.cluster.slo import default_slo
from festina_hpc.policy.common import SHORT_OUTPUT_TOKENS, TBT_PLANNING, TokenStats
from festina_hpc.policy.festina import (
    BURST_MEMORY_S,
    QUIET_KEEP_ALIVES,
    SCALE_IN_IDLE_S,
    SCALE_OUT_AFTER_S,
    BurstMeter,
    FestinaPolicy,
    Load,
    Solution,
    Typical,
)
from festina_hpc.policy.types import (
    Arrival,
    Drop,
    EndedRequest,
    Ending,
    InstancePhase,
    Migrate,
    NodePower,
    Request,
    Route,
    Slo,
    StartInstance,
    StopInstance,
)
from festina_hpc.sim.cluster import SimInstance
from festina_hpc.sim.engine import Event
from festina_hpc.sim.simulator import Simulation
from festina_hpc.sim.workload import DEFAULT_MODEL_MIX
from tests.policy.conftest import GPU, STORE, FakeInstance, FakeView, make_policy_for, poisson_requests

MODEL = "llama-3.1-8b"
SLOS: dict[str, Slo] = {m: default_slo(STORE, GPU, m) for m in DEFAULT_MODEL_MIX}
MAX_CLOCK_MHZ = STORE.gpu(GPU).max_clock_mhz
MIN_TABLE_CLOCK_MHZ = min(STORE.gpu(GPU).table_clocks_mhz)


def festina(name: str = "festina", live_share_change: bool = False) -> FestinaPolicy:
    policy = make_policy_for(name, live_share_change=live_share_change)
    assert isinstance(policy, FestinaPolicy)
    return policy


def fake_view(nodes: int = 1, models: Iterable[str] = (MODEL,)) -> FakeView:
    return FakeView(nodes=nodes, models=models, slos=SLOS)


def load_of(inst: FakeInstance, instance_id: int | None = None) -> Load:
    """What the controller plans for ``inst`` (as ``control`` builds it)."""
    load = festina().load_of(inst)
    return load if instance_id is None else dataclasses.replace(load, instance_id=instance_id)


def request(rid: int, model: str = MODEL) -> Arrival:
    return Arrival(rid, 0.0, model, 512)


def completed(output_tokens: int, prompt_tokens: int = 1024, model: str = MODEL) -> EndedRequest:
    """A request that was served to its end, as a driver reports it."""
    return EndedRequest(model, prompt_tokens, output_tokens, Ending.COMPLETED, ttft_s=0.1, tbt_s=0.02)


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


def chunk_step_s(policy: FestinaPolicy, load: Load, sm_pct: float, clock_mhz: int, chunk_tokens: int) -> float:
    """A step that prefills a whole chunk while decoding the load's batch (what the engine runs)."""
    table = STORE.table(GPU, load.model)
    context = policy._typical(load.model).decode_context_tokens
    return (table.lookup("prefill", 1, chunk_tokens, sm_pct, clock_mhz, clamp=True).latency_s
            + table.lookup("decode", load.batch, context, sm_pct, clock_mhz, clamp=True).latency_s)


def observed(policy: FestinaPolicy, output_tokens: int, prompt_tokens: int = 1024, count: int = 200) -> FestinaPolicy:
    """The policy after ``count`` requests of these lengths arrived and completed (what it learns its
    workload from: prompts as they arrive, outputs from the driver's feedback)."""
    for _ in range(count):
        policy.stats.observe_prompt(MODEL, prompt_tokens)
    policy.feedback([completed(output_tokens, prompt_tokens)] * count)
    return policy


def test_short_requests_get_a_chunk_whose_steps_keep_their_tbt() -> None:
    """Requests of a few tokens average nothing away: one step that carries a 2048-token chunk
    (longer than the 8B model's TBT SLO even at full speed) spoils their TBT. Where most requests
    are that short, the controller picks settings whose chunk-carrying step keeps the TBT SLO
    (a smaller chunk); where requests are long, the mean is what matters, and it saves power."""
    limit_s = TBT_PLANNING * SLOS[MODEL].tbt_s
    steps = {}
    for output_tokens in (4, 256):
        view = fake_view()
        inst = view.add(FakeInstance(0, MODEL, (0,), running=16, arrival_rate_per_s=2.0))
        policy = observed(festina(), output_tokens)
        load = policy.load_of(inst)
        solved = policy.solve(view, [load])
        assert solved is not None
        steps[output_tokens] = chunk_step_s(policy, load, solved.sm_pct[0], solved.clock_mhz, solved.chunk_tokens[0])
    assert chunk_step_s(policy, load, 100.0, MAX_CLOCK_MHZ, 2048) > limit_s  # the premise
    assert steps[4] <= limit_s < steps[256]


def test_the_short_output_logic_switches_on_from_feedback_alone() -> None:
    """Placements tell the policy prompts only: after 200 arrivals it still plans for the prior's
    256-token answers, and its chunk-carrying step misses the short requests' TBT. Once the driver
    reports those requests completed with 4 tokens each, the next scale tick plans with what they
    generated, and the step keeps the TBT (as in the test above, where the lengths were learnt)."""
    limit_s = TBT_PLANNING * SLOS[MODEL].tbt_s
    view = fake_view()
    inst = view.add(FakeInstance(0, MODEL, (0,), running=16, arrival_rate_per_s=2.0))
    policy = festina()

    def step_s() -> float:
        load = policy.load_of(inst)
        solved = policy.solve(view, [load])
        assert solved is not None
        return chunk_step_s(policy, load, solved.sm_pct[0], solved.clock_mhz, solved.chunk_tokens[0])

    for rid in range(200):
        policy.place(Arrival(rid, 0.0, MODEL, 1024), view)
    policy.scale(view)
    assert policy._typical(MODEL).output_tokens == 256.0 and policy._typical(MODEL).short_output_share == 0.0
    assert step_s() > limit_s
    policy.feedback([completed(4)] * 200)
    policy.scale(view)
    typical = policy._typical(MODEL)
    assert typical.short_output_share > 0.9 and typical.output_tokens < 8
    assert step_s() <= limit_s


def test_refused_and_failed_requests_teach_no_output_length() -> None:
    """A refusal generated nothing and a cut request was cut: neither is how long the model's answers run."""
    policy = festina()
    policy.feedback([EndedRequest(MODEL, 512, 0, Ending.REFUSED), EndedRequest(MODEL, 512, 3, Ending.FAILED, 0.1)])
    assert policy.stats.output_tokens(MODEL) == 256.0 and policy.stats.short_output_share(MODEL) == 0.0
    policy.feedback([completed(16)])
    assert policy.stats.output_tokens(MODEL) == pytest.approx(256.0 + 0.05 * (16 - 256))


def test_an_overloaded_gpu_runs_flat_out_and_keeps_tbt_before_queues() -> None:
    """No setting keeps both co-residents' SLOs: the GPU runs at its max clock, the light instance
    keeps the least share that keeps its SLOs, the overloaded one takes the rest. The light one's
    chunk keeps its steps within the TBT SLO; the overloaded one, whose batch no chunk keeps
    within it, takes the smallest (not the engine's 2048 tokens, which were given before)."""
    view = fake_view()
    heavy = view.add(FakeInstance(0, MODEL, (0,), sm_pct=50, memory_fraction=0.5, running=64, waiting=200,
                                  arrival_rate_per_s=4.0))
    light_one = view.add(FakeInstance(1, MODEL, (0,), sm_pct=50, memory_fraction=0.5, running=4,
                                      arrival_rate_per_s=0.5))
    policy = observed(festina(live_share_change=True), output_tokens=4)  # shares change in place
    assert policy.solve(view, [policy.load_of(heavy), policy.load_of(light_one)]) is None
    settings = policy.control(view.gpu(0), view)
    assert settings is not None and settings.clock_mhz == MAX_CLOCK_MHZ
    shares = {i: settings.sm_pct.get(i, view.instance(i).sm_pct) for i in (0, 1)}
    assert sum(shares.values()) <= 100.0
    light_load = policy.load_of(light_one)
    least = policy._least_share(view, light_load, MAX_CLOCK_MHZ, policy._control_ttft_s(view, light_load))
    assert least is not None and least[0] == shares[1]
    limit_s = SLOS[MODEL].tbt_s
    assert chunk_step_s(policy, light_load, shares[1], MAX_CLOCK_MHZ, settings.chunk_tokens[1]) <= limit_s
    heavy_load = policy.load_of(heavy)
    assert all(chunk_step_s(policy, heavy_load, shares[0], MAX_CLOCK_MHZ, c) > limit_s for c in (2048, 1024, 512))
    assert settings.chunk_tokens[0] == 512


def test_the_planned_clock_never_falls_as_the_queue_grows() -> None:
    view = fake_view()
    policy = festina()
    clocks = []
    for waiting in (0, 2, 4, 8, 16, 24, 32, 64, 96, 128):
        solved = policy.solve(view, [Load(0, MODEL, 32 + waiting, (waiting + 1) * 1024, 1.0)])
        clocks.append(MAX_CLOCK_MHZ if solved is None else solved.clock_mhz)  # control() runs flat out when None
    assert clocks == sorted(clocks)


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-2-70b"])
def test_step_times_read_off_the_grid_points_are_the_tables_own_lookups(model: str) -> None:
    table = STORE.table(GPU, model)
    typical = Typical(prompt_tokens=1500.0, long_prompt_tokens=3700.0, output_tokens=300.0, short_output_share=0.01)
    for sm_pct in (10.0, 40.0, 70.0, 100.0):
        for clock_mhz in (MIN_TABLE_CLOCK_MHZ, MAX_CLOCK_MHZ):
            steps = FestinaPolicy._read_step_times(table, typical, sm_pct, clock_mhz)
            for batch in (1, 3, 5, 48, 100, 511, 4096):  # between grid points, and past the largest (clamped)
                decode = table.lookup("decode", batch, typical.decode_context_tokens, sm_pct, clock_mhz, clamp=True)
                assert steps.decode_step_s(batch) == pytest.approx(decode.latency_s, rel=1e-12)
                assert steps.decode_step_power_w(batch) == pytest.approx(decode.power_w, rel=1e-12)
            prefills = {tokens: table.lookup("prefill", 1, tokens, sm_pct, clock_mhz, clamp=True).latency_s
                        for tokens in (128, 384, 896, 2048, 1500.0)}
            for k in (1, 3, 7, 16):
                assert steps.prefill_s[k] == pytest.approx(prefills[128 * k], rel=1e-12)
            assert steps.typical_prefill_s == pytest.approx(prefills[1500.0], rel=1e-12)
            assert steps.long_prefill_s[0] == pytest.approx(prefills[2048], rel=1e-12)  # the p90 prompt's first chunk


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
            # What each instance reserves: its own share and fraction, less for a share restart's
            # replacement while the instance it restarts is there (sim/cluster.py).
            assert gpu.memory_fraction_allocated == pytest.approx(sum(i.memory_fraction_reserved for i in residents))
            assert gpu.sm_pct_allocated == pytest.approx(sum(i.sm_pct_reserved for i in residents))
            # A share restart's replacement waiting for the old one's memory holds none yet.
            weights = sum(i.info.weights_bytes_per_gpu for i in residents if not i.waits_for_memory)
            kv = sum(i.kv_tokens_reserved * i.info.kv_bytes_per_token_per_gpu for i in residents)
            # A lone request too big for its cache is admitted anyway (vLLM truncates it): not counted.
            kv_single = sum(i.kv_tokens_reserved * i.info.kv_bytes_per_token_per_gpu for i in residents
                            if i.running <= 1 and i.kv_tokens_reserved > i.kv_capacity_tokens)
            assert weights + kv - kv_single <= usable * gpu.memory_fraction_allocated + 1e-6, gpu.id
            self.max_instances_per_gpu = max(self.max_instances_per_gpu, len(residents))
        return events


def run_checked(models: Sequence[str], rate_per_s: float, duration_s: float, seed: int = 0,
                gpus: int = 4, policy: str = "festina",
                live_share_change: bool = False) -> tuple[CheckedSimulation, list[Request]]:
    requests = poisson_requests(np.random.default_rng(seed), {m: rate_per_s for m in models}, duration_s,
                                prompt_tokens=(64, 2048), output_tokens=(8, 512))
    sim = CheckedSimulation(ClusterConfig(nodes=1, gpus_per_node=gpus), STORE, festina(policy, live_share_change),
                            requests, {m: SLOS[m] for m in models}, live_share_change=live_share_change)
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


def test_every_model_is_deployed_at_the_first_scale_tick_where_whole_gpus_hold_them_all() -> None:
    """Five single-GPU models and a 70B at TP4 on two 8-GPU nodes: the first tick starts one
    instance of each, the 70B first (four GPUs of one node), each on GPUs of its own, so the first
    requests meet a warm instance. Later ticks deploy nothing more. Where the GPUs are too few
    for all, none is deployed up front (a model left out would find every GPU's SMs taken)."""
    models = (*SMALL_MODELS, "llama-3.1-70b")
    view = fake_view(nodes=2, models=models)
    policy = festina()
    starts = [a for a in policy.scale(view).actions if isinstance(a, StartInstance)]
    assert [s.model for s in starts] == ["llama-3.1-70b", *SMALL_MODELS]
    assert len(set(starts[0].gpus)) == 4 and len({view.gpu(g).node for g in starts[0].gpus}) == 1
    assert len({g for s in starts for g in s.gpus}) == 9
    for s in starts:
        view.add(FakeInstance(100 + len(list(view.instances())), s.model, s.gpus, memory_fraction=s.memory_fraction))
    assert not policy.scale(view).actions

    few = FakeView(nodes=1, gpus_per_node=4, models=SMALL_MODELS, slos=SLOS)
    assert not festina().scale(few).actions


def test_models_outnumbering_gpus_share_them_rather_than_being_dropped() -> None:
    """Where shares change in place: the instances started on whole GPUs give back what they do
    not need at once. (With share restarts they give back only what they have not needed for
    SHARE_SETTLE_S, here little: the fifth model finds no room; placement is to start smaller.)"""
    sim, _ = run_checked(SMALL_MODELS, rate_per_s=0.2, duration_s=120.0, live_share_change=True)
    result = sim.run()
    assert sim.max_instances_per_gpu >= 2
    assert "no capacity for a new instance" not in result.drop_reasons, result.drop_reasons


# -- consolidation ---------------------------------------------------------------------------------------


def two_node_view(resident: FakeInstance) -> FakeView:
    """Node 0: seven busy instances on whole GPUs and ``resident`` on half of GPU 7; node 1: one light
    instance on half of GPU 8, the least-loaded node, which fits nowhere but beside ``resident``."""
    view = fake_view(nodes=2, models=(MODEL, "mistral-7b"))
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


def test_when_the_least_loaded_node_has_nowhere_to_go_the_next_one_is_emptied_into_it() -> None:
    """2-GPU nodes, as on the dev cluster. Node 0 full (a light instance on each GPU, whole), node 1
    one idle instance on a fifth of GPU 2: node 1, the least loaded, cannot move into node 0, but
    node 0 fits into node 1, every SLO kept and no GPU's shares past 100, the plan's own moves
    counted."""
    view = FakeView(nodes=2, gpus_per_node=2, models=(MODEL,), slos=SLOS)
    for g in (0, 1):
        view.add(FakeInstance(g, MODEL, (g,), memory_fraction=0.5, running=1, arrival_rate_per_s=0.1))
    view.add(FakeInstance(2, MODEL, (2,), sm_pct=20, memory_fraction=0.3))
    moves = [a for a in festina().consolidate(view).actions if isinstance(a, Migrate)]
    assert sorted(m.instance_id for m in moves) == [0, 1]
    for g in (2, 3):
        landing = [m for m in moves if m.gpus == (g,)]
        assert sum(m.sm_pct for m in landing) + view.gpu(g).sm_pct_allocated <= 100.0
        assert sum(m.memory_fraction for m in landing) + view.gpu(g).memory_fraction_allocated <= 1.0 + 1e-9


def test_moves_planned_onto_one_gpu_leave_its_shares_within_100() -> None:
    """Node 0 full (two instances sharing GPU 0, a whole-GPU one on GPU 1), node 1 one idle
    instance on a fifth of GPU 2. Alone, each of node 0's instances would take more than half of
    an empty GPU at its lowest-power clock; two moved onto GPU 3 fit only at a higher clock, with
    smaller shares than the first move was given. Every plan keeps the shares it hands out on a
    GPU, with what is there, within 100 (it was 130)."""
    view = FakeView(nodes=2, gpus_per_node=2, models=(MODEL,), slos=SLOS)
    for i in (0, 1):
        view.add(FakeInstance(i, MODEL, (0,), sm_pct=50, memory_fraction=0.3, running=1, arrival_rate_per_s=0.1))
    view.add(FakeInstance(2, MODEL, (1,), memory_fraction=0.6, running=1, arrival_rate_per_s=0.1))
    view.add(FakeInstance(3, MODEL, (2,), sm_pct=20, memory_fraction=0.3))
    moves = [a for a in festina().consolidate(view).actions if isinstance(a, Migrate)]
    for g in range(4):
        assert sum(m.sm_pct for m in moves if g in m.gpus) + view.gpu(g).sm_pct_allocated <= 100.0, moves


def test_a_consolidation_that_keeps_every_slo_moves_the_least_loaded_node() -> None:
    light = FakeInstance(7, MODEL, (7,), sm_pct=50, memory_fraction=0.5, running=8, arrival_rate_per_s=0.5)
    plan = festina().consolidate(two_node_view(light))
    assert [(a.instance_id, a.gpus, a.memory_fraction) for a in plan.actions if isinstance(a, Migrate)] == [
        (8, (7,), 0.5)]
    assert len(plan.actions) == 1


def test_an_evacuation_stops_the_quiet_instances_it_would_move_and_a_node_that_stays_on_keeps_them() -> None:
    """As above, with a quiet mistral-7b instance beside the light one on node 1: emptying node 1
    stops it rather than moving it (a cold start for nothing). A quiet instance on node 0, which
    stays on, is kept: stopping it would save no energy and cost its next request a cold start."""
    light = FakeInstance(7, MODEL, (7,), sm_pct=50, memory_fraction=0.5, running=8, arrival_rate_per_s=0.5)
    view = two_node_view(light)
    quiet = view.add(FakeInstance(9, "mistral-7b", (9,), memory_fraction=0.4))
    view.now_s = QUIET_KEEP_ALIVES * 60.0 + 1.0  # the default keep-alive, 60 s, times QUIET_KEEP_ALIVES
    policy = festina()
    plan = policy.consolidate(view)
    assert [(type(a), a.instance_id) for a in plan.actions] == [(Migrate, 8), (StopInstance, quiet.id)]
    assert not policy.scale(view).actions

    view.now_s -= 2.0  # not yet quiet: it would have to move, and node 0 has no room for it
    assert not festina().consolidate(view).actions


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


@pytest.mark.parametrize("queued_elsewhere", [True, False])
def test_a_request_waits_for_a_waking_node_only_where_nothing_serves_it_sooner(queued_elsewhere: bool) -> None:
    """Node 0 is full; a MODEL instance loads on node 1, which wakes for two more minutes. A
    request goes to a ready instance whose queue serves it in seconds rather than to the loading
    one (it was called safe: its queue is empty); with no ready instance, to the loading one
    rather than to another start that waits for a node too."""
    view = fake_view(nodes=3, models=(MODEL, "mistral-7b"))
    view.node(1).power, view.node(1).ready_at_s = NodePower.WAKING, 120.0
    view.node(2).power = NodePower.OFF
    if queued_elsewhere:  # a minute's queue: longer than a cold start on a powered GPU, shorter than the wake
        queued = view.add(FakeInstance(0, MODEL, (0,), running=8, waiting=600, arrival_rate_per_s=2.0))
    else:
        view.add(FakeInstance(0, "mistral-7b", (0,), running=2))
    for g in range(1, 8):
        view.add(FakeInstance(g, "mistral-7b", (g,), running=2))
    loading = view.add(FakeInstance(8, MODEL, (8,), phase=InstancePhase.LOADING, ready_at_s=math.inf))
    policy = festina()
    for rid in range(8):
        assert policy.place(request(rid), view) == Route(queued.id if queued_elsewhere else loading.id), rid


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


OTHER = "mistral-7b"


def test_a_new_instance_goes_beside_the_co_resident_it_fits_best() -> None:
    view = fake_view(models=(MODEL, OTHER))
    policy = festina()
    fraction = policy._memory_fraction(view, view.model(MODEL))
    free = {0: fraction - 0.05, 1: fraction + 0.2, 2: fraction + 0.05, 3: fraction}  # GPU -> memory left free
    for g, memory_free in free.items():
        view.add(FakeInstance(g, OTHER, (g,), sm_pct=80 if g == 3 else 50, memory_fraction=1.0 - memory_free))
    for g in range(4, 8):
        view.add(FakeInstance(g, OTHER, (g,)))
    policy.scale(view)
    # GPU 3 would fit exactly but has 20% of its SMs free, fewer than a new instance starts with.
    assert policy.place(request(0), view) == StartInstance(MODEL, (2,), sm_pct=50.0, memory_fraction=fraction)


@pytest.mark.parametrize(("co_resident_sm_pct", "empty_gpu", "first", "expected_gpu"),
                         [(50, True, False, 0), (60, True, False, 7), (60, False, False, 0), (60, True, True, 0)])
def test_a_further_instance_takes_an_empty_gpu_before_a_small_share_beside_another(
        co_resident_sm_pct: float, empty_gpu: bool, first: bool, expected_gpu: int) -> None:
    """Half a GPU's SMs free beside a co-resident is room for a model's further instance; 40% comes
    after an empty GPU of a node that is on, and still before waking a node. A model's first
    instance takes the 40% and leaves the empty GPU to models to come."""
    view = fake_view(nodes=2, models=(MODEL, OTHER))
    view.node(1).power = NodePower.OFF
    view.add(FakeInstance(0, OTHER, (0,), sm_pct=co_resident_sm_pct, memory_fraction=0.5))
    for g in range(1, 7 if empty_gpu else 8):
        view.add(FakeInstance(g, OTHER if first or g > 1 else MODEL, (g,)))
    policy = festina()
    policy.scale(view)
    start = policy._where_to_start(view, view.model(MODEL))
    assert start is not None and start.gpus == (expected_gpu,), start
    assert start.sm_pct == (100.0 if expected_gpu == 7 else 100.0 - co_resident_sm_pct)


def test_a_further_instance_never_goes_beside_its_own_models_instance() -> None:
    """Half of GPU 0 is free beside the model's own instance: a second one there adds no compute
    (the first can grow its share), so the start takes the empty GPU 7."""
    view = fake_view(models=(MODEL, OTHER))
    view.add(FakeInstance(0, MODEL, (0,), sm_pct=50, memory_fraction=0.4))
    for g in range(1, 7):
        view.add(FakeInstance(g, OTHER, (g,)))
    policy = festina()
    policy.scale(view)
    start = policy._where_to_start(view, view.model(MODEL))
    assert start is not None and start.gpus == (7,), start


def test_without_the_controller_a_start_on_an_empty_gpu_takes_its_memory_whole() -> None:
    """With control, an instance alone on a GPU keeps memory for a co-resident its shrinking share
    will make room for; without (the ablation's placement alone) no share shrinks, so nothing
    could join it and the memory is its KV room."""
    starts = {}
    for name in ("festina", "festina-placement"):
        view = fake_view(models=(MODEL, OTHER))
        policy = festina(name)
        policy.scale(view)
        start = policy._where_to_start(view, view.model(MODEL))
        assert start is not None and start.sm_pct == 100.0, start
        starts[name] = start.memory_fraction
    assert starts["festina"] < 1.0 and starts["festina-placement"] == 1.0, starts


class CountingView(FakeView):
    """Counts the GPUs and nodes a policy reads."""

    reads = 0

    def gpu(self, gpu_id: int):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().gpu(gpu_id)

    def node(self, node_id: int):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().node(node_id)


@pytest.mark.parametrize("co_located", [True, False])
def test_a_start_reads_as_few_gpus_on_a_large_cluster_as_on_a_small_one(co_located: bool) -> None:
    """Starting an instance looks at a few candidates, not the whole cluster: on 8 and 128 busy
    nodes (each with one GPU that has room beside its instance, or that is empty), the request that
    needs a start reads as many GPUs and nodes."""
    reads = {}
    for nodes in (8, 128):
        view = CountingView(nodes=nodes, models=(MODEL, OTHER), slos=SLOS)
        for g in range(nodes * 8):
            if g % 8 != 7:
                view.add(FakeInstance(g, OTHER, (g,)))
            elif co_located:
                view.add(FakeInstance(g, OTHER, (g,), sm_pct=50, memory_fraction=0.5))
        policy = festina()
        policy.scale(view)  # the tick that takes the cluster's headroom
        view.reads = 0
        decision = policy.place(request(0), view)
        assert isinstance(decision, StartInstance) and decision.gpus == (7,), decision
        reads[nodes] = view.reads
    assert reads[128] <= reads[8], reads


def test_a_start_between_scale_ticks_is_room_for_the_next_one() -> None:
    view = fake_view(models=(MODEL, OTHER))
    policy = festina()
    policy.scale(view)  # an empty node
    first = policy.place(request(0, OTHER), view)
    assert isinstance(first, StartInstance) and first.memory_fraction <= 0.5
    # The driver starts it, and the controller gives it half the SMs.
    view.add(FakeInstance(0, OTHER, first.gpus, sm_pct=50, memory_fraction=first.memory_fraction))
    second = policy.place(request(1), view)
    assert isinstance(second, StartInstance) and second.gpus == first.gpus, (first, second)


def test_an_instance_with_room_for_its_models_typical_long_prompts_starts_no_other() -> None:
    """Spare room is judged against the SLO of the model's typical prompt (3,000 tokens here), not
    the SLO of a 1,024-token one, which no prompt of 3,000 tokens meets: a lightly loaded
    instance has room, and scale() starts nothing (it used to start an instance every
    SCALE_OUT_AFTER_S on a long-prompt trace)."""
    view = fake_view()
    inst = view.add(FakeInstance(0, MODEL, (0,), running=2, arrival_rate_per_s=0.3, prompt_tokens_each=3000))
    policy = observed(festina(), output_tokens=30, prompt_tokens=3000)
    assert policy._has_spare(view, inst)
    for _ in range(4):
        assert not policy.scale(view).actions
        view.now_s += SCALE_OUT_AFTER_S / 2


# -- provisioning for bursts -----------------------------------------------------------------------------


def test_a_burst_meter_sums_the_prompt_tokens_of_one_window_before_each_request() -> None:
    meter = BurstMeter(window_s=0.3)
    for now_s, tokens in ((0.0, 100), (0.1, 200), (0.35, 400), (1.0, 800)):
        meter.observe(now_s, tokens)
    assert list(meter.bursts(1.0)) == [100.0, 300.0, 600.0, 800.0]
    assert list(meter.bursts(0.5 + BURST_MEMORY_S)) == [800.0]  # older requests are forgotten


def fed(arrivals: Iterable[tuple[float, str]], models: Sequence[str] = (MODEL,),
        nodes: int = 1) -> tuple[FestinaPolicy, FakeView]:
    """A policy that placed 2,000-token requests arriving at these times onto one instance per model."""
    view = fake_view(nodes=nodes, models=models)
    for g, model in enumerate(models):
        view.add(FakeInstance(g, model, (g,)))
    policy = festina()
    for rid, (now_s, model) in enumerate(arrivals):
        view.now_s = now_s
        policy.place(Arrival(rid, now_s, model, 2000), view)
        policy.feedback([completed(30, 2000, model)])
    return policy, view


def bursty(model: str = MODEL, bursts: int = 30) -> list[tuple[float, str]]:
    """20 requests within 0.2 s every 10 s: 2 per second on average."""
    return [(k * 10.0 + j * 0.01, model) for k in range(bursts) for j in range(20)]


def steady(model: str = MODEL, seconds: int = 300) -> list[tuple[float, str]]:
    return [(k * 0.5, model) for k in range(2 * seconds)]


def test_bursty_traffic_is_given_instances_for_its_bursts_and_steady_traffic_at_the_same_rate_is_not() -> None:
    """Each burst is 40,000 prompt tokens within the 8B model's TTFT SLO (0.22 s): one instance
    needs about 1.6 s for it, so the bursts need several instances to be drained in time. The
    same rate arriving evenly needs one."""
    policy, view = fed(bursty())
    assert policy._burst_instances(view)[MODEL] >= 4
    policy, view = fed(steady())
    assert policy._burst_instances(view) == {MODEL: 1}


def test_scale_starts_the_instances_bursts_need_and_keeps_them_while_idle() -> None:
    policy, view = fed(bursty())
    assert policy._has_spare(view, view.instance(0))  # room for the mean load: the bursts alone ask
    policy.scale(view)
    view.now_s += SCALE_OUT_AFTER_S
    starts = [a for a in policy.scale(view).actions if isinstance(a, StartInstance)]
    assert [a.model for a in starts] == [MODEL]

    need = policy._burst_instances(view)[MODEL]
    # One more instance than the bursts need, the extra ones idle long enough to stop: one stops.
    # As many as they need: none does. With one node powered, none does either: it never goes off.
    assert stopped_after_idle(instances=need + 1) == 1
    assert stopped_after_idle(instances=need) == 0
    assert stopped_after_idle(instances=need + 1, nodes=1) == 0


def stopped_after_idle(instances: int, nodes: int = 2) -> int:
    """Instances scale() stops after the bursts above, of ``instances`` (one busy, with spare room,
    the others idle for longer than SCALE_IN_IDLE_S) on node 0 of ``nodes`` powered ones."""
    policy, view = fed(bursty(), nodes=nodes)
    view.instance(0).running = 2
    for g in range(1, instances):
        view.add(FakeInstance(g, MODEL, (g,)))
    view.now_s += SCALE_IN_IDLE_S + 1
    return sum(1 for a in policy.scale(view).actions if isinstance(a, StopInstance))


def test_an_instance_that_a_models_bursts_need_is_not_evicted_for_another_model() -> None:
    """As in the eviction test above, but mistral-7b's traffic comes in bursts that need both its
    instances: its idle one stays, and MODEL's shortage waits."""
    policy, _ = fed(bursty("mistral-7b", bursts=30), models=("mistral-7b",))
    view = fake_view(models=(MODEL, "mistral-7b"))
    view.now_s = 300.0
    for g in range(6):
        view.add(FakeInstance(g, MODEL, (g,), running=8, waiting=12, arrival_rate_per_s=2.0))
    view.add(FakeInstance(6, "mistral-7b", (6,), running=2, arrival_rate_per_s=0.2))
    view.add(FakeInstance(7, "mistral-7b", (7,)))
    assert policy._burst_instances(view)["mistral-7b"] >= 2
    policy.place(request(0), view)
    assert not _scale_while_short(policy, view)


def test_the_share_of_short_requests_is_learnt_from_the_first_request_on() -> None:
    stats = TokenStats()
    assert stats.short_output_share(MODEL) == 0.0  # nothing seen: no tail to plan for
    for output_tokens in (4, SHORT_OUTPUT_TOKENS, 100):
        stats.observe_output(MODEL, output_tokens)
    assert stats.short_output_share(MODEL) == pytest.approx(2 / 3)  # the mean of the first requests
    for _ in range(2000):
        stats.observe_output(MODEL, 100)
    assert stats.short_output_share(MODEL) < 0.01  # then a moving mean: old requests fade


def test_a_model_with_no_instance_on_a_full_cluster_takes_an_idle_one_rather_than_dropping() -> None:
    """Every GPU holds a mistral-7b instance, one of them idle: a request for a model with no
    instance evicts the idle one for its own (scale() only grows models that have one; it was a
    drop, request after request)."""
    view = fake_view(models=(MODEL, "mistral-7b"))
    for g in range(7):
        view.add(FakeInstance(g, "mistral-7b", (g,), running=2, arrival_rate_per_s=0.2))
    idle = view.add(FakeInstance(7, "mistral-7b", (7,)))
    start = festina().place(request(0), view)
    assert isinstance(start, StartInstance)
    assert (start.model, start.gpus, start.evict) == (MODEL, (7,), (idle.id,))


def test_a_model_with_no_instance_comes_before_the_burst_capacity_of_another() -> None:
    """As above, but mistral-7b's bursts need both its instances: a model with no instance at all
    still takes the idle one (its every request was dropped, for an hour of the code trace on one
    node, while the bursts' second instance sat idle)."""
    policy, _ = fed(bursty("mistral-7b", bursts=30), models=("mistral-7b",))
    view = fake_view(models=(MODEL, "mistral-7b"))
    view.now_s = 300.0
    for g in range(7):
        view.add(FakeInstance(g, "llama-2-13b" if g < 6 else "mistral-7b", (g,), running=2))
    idle = view.add(FakeInstance(7, "mistral-7b", (7,)))
    assert policy._burst_instances(view)["mistral-7b"] >= 2
    start = policy.place(request(0), view)
    assert isinstance(start, StartInstance)
    assert (start.model, start.gpus, start.evict) == (MODEL, (7,), (idle.id,))


def test_an_eviction_makes_room_beside_a_co_resident_and_never_takes_a_models_last_instance() -> None:
    """Every GPU's SM shares are taken, by busy instances but on GPU 7, where an idle mistral-7b
    instance (its model has another) sits beside a busy llama-2-7b one: evicting it leaves the
    memory and share a new instance needs, so the start goes there with that share. Had the idle
    instance been its model's last, nothing is evicted and the request is dropped."""
    def full_view(idle_model: str) -> tuple[FakeView, FakeInstance]:
        view = fake_view(models=(MODEL, "mistral-7b", "llama-2-7b", "llama-2-13b", "mistral-nemo-12b"))
        for g in range(6):
            view.add(FakeInstance(g, "llama-2-13b", (g,), running=2))
        view.add(FakeInstance(6, "mistral-7b", (6,), running=2))
        view.add(FakeInstance(7, "llama-2-7b", (7,), running=2, sm_pct=50.0, memory_fraction=0.5))
        return view, view.add(FakeInstance(8, idle_model, (7,), sm_pct=50.0, memory_fraction=0.5))

    view, idle = full_view("mistral-7b")
    start = festina().place(request(0), view)
    assert isinstance(start, StartInstance)
    assert start.memory_fraction <= 0.5
    assert (start.model, start.gpus, start.sm_pct, start.evict) == (MODEL, (7,), 50.0, (idle.id,))

    view, _ = full_view("mistral-nemo-12b")  # its model's only instance
    assert isinstance(festina().place(request(0), view), Drop)


def test_a_model_with_no_instance_takes_the_gpu_of_a_quiet_models_last_instance() -> None:
    """Every GPU busy but GPU 7, whose mistral-7b instance is its model's last: it makes way once
    its model has been quiet for QUIET_KEEP_ALIVES keep-alives (what scaling to zero would have
    done), not before."""
    view = fake_view(models=(MODEL, "mistral-7b", "llama-2-13b"))
    for g in range(7):
        view.add(FakeInstance(g, "llama-2-13b", (g,), running=2))
    quiet = view.add(FakeInstance(7, "mistral-7b", (7,)))
    assert isinstance(festina().place(request(0), view), Drop)
    view.now_s = QUIET_KEEP_ALIVES * 60.0 + 1.0
    start = festina().place(request(0), view)
    assert isinstance(start, StartInstance) and start.evict == (quiet.id,)


def test_two_models_scaling_out_in_one_tick_are_not_given_the_same_gpu() -> None:
    """Both models keep missing and one GPU is free: scale() starts one of them there, not both
    (the second start used to be refused by the cluster)."""
    view = fake_view(models=(MODEL, "mistral-7b"))
    for g in range(6):
        view.add(FakeInstance(g, MODEL, (g,), running=8, waiting=12, arrival_rate_per_s=2.0))
    view.add(FakeInstance(6, "mistral-7b", (6,), running=8, waiting=12, arrival_rate_per_s=2.0))
    policy = festina()
    policy.place(Arrival(0, 0.0, "mistral-7b", 512), view)
    policy.scale(view)
    view.now_s += SCALE_OUT_AFTER_S
    policy.place(Arrival(1, view.now_s, "mistral-7b", 512), view)
    starts = _scale_while_short(policy, view)
    assert [a.gpus for a in starts] == [(7,)]


def test_a_share_grown_past_what_is_free_takes_the_room_of_a_small_shrink_too() -> None:
    """The solution shrinks one co-resident by less than the hysteresis step and grows the other
    by more: both changes are made, so the GPU's shares stay within 100 (the grow alone was
    refused by the cluster)."""
    view = fake_view()
    view.add(FakeInstance(0, MODEL, (0,), sm_pct=30, memory_fraction=0.5, running=4, arrival_rate_per_s=0.5))
    view.add(FakeInstance(1, MODEL, (0,), sm_pct=60, memory_fraction=0.5, running=4, arrival_rate_per_s=0.5))
    policy = festina(live_share_change=True)  # shares change in place
    policy.solve = lambda view, loads: Solution(MAX_CLOCK_MHZ, {0: 28.0, 1: 72.0}, {0: 512, 1: 512})  # type: ignore[method-assign]
    settings = policy.control(view.gpu(0), view)
    assert settings is not None and settings.sm_pct == {0: 28.0, 1: 72.0}
    assert list(settings.sm_pct) == [0, 1]  # the shrink first
