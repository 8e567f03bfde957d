"""Hardware costs the simulator charges: clock changes take time, co-resident instances share HBM
bandwidth, a GPU holding a loaded model idles above its bare idle power."""

from __future__ import annotations

import numpy as np
import pytest

from festina_hpc.policy.types import GpuSettings, StartInstance
from festina_hpc.sim.cluster import Activity, RequestRecord, SimInstance
from festina_hpc.sim.simulator import Simulation
from tests.policy.conftest import GPU, STORE, poisson_requests, request, simulate, simulation

MAX_CLOCK_MHZ = STORE.gpu(GPU).max_clock_mhz


def _ready(sim: Simulation, decision: StartInstance) -> SimInstance:
    inst, _ = sim._start(decision)
    sim._instance_ready(inst)
    return inst


def _queue(inst: SimInstance, n: int, prompt_tokens: int, output_tokens: int, first_id: int = 0) -> None:
    inst.queue.extend(RequestRecord(request(inst.model, prompt_tokens, output_tokens, rid=first_id + i))
                      for i in range(n))


def _until_decoding(sim: Simulation, inst: SimInstance) -> None:
    """Run the instance's prefill steps (alone in simulated time) until it plans a decode run."""
    events = sim._next_step(inst)
    while inst.activity is not Activity.DECODE:
        sim._now = events[-1].time_s  # its own STEP_DONE comes last (after any co-resident's cut)
        events = sim._step_done(inst)


# -- clock changes --------------------------------------------------------------------------------


def test_a_step_starting_right_after_a_clock_change_runs_at_the_old_clock() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=1)
    inst = _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    gpu = sim.gpu(0)
    sim._apply_settings(gpu, GpuSettings(clock_mhz=900))
    _queue(inst, 1, 2048, 1)
    sim._next_step(inst)  # a prefill, compute-bound: its latency shows the clock
    table = inst.table
    assert inst.step_latency_s == table.lookup("prefill", 1, 2048, 100, MAX_CLOCK_MHZ).latency_s
    assert gpu.clock_mhz == MAX_CLOCK_MHZ and sim.clock_changes == 0
    sim._now = sim.config.clock_change_s * 0.99
    sim._land_clocks()
    assert gpu.clock_mhz == MAX_CLOCK_MHZ and sim.clock_changes == 0  # still on its way
    sim._now = sim.config.clock_change_s
    sim._land_clocks()
    assert gpu.clock_mhz == 900 and sim.clock_changes == 1
    sim._step_done(inst)  # the request is done (one output token): the instance idles
    _queue(inst, 1, 2048, 1, first_id=1)
    sim._next_step(inst)  # ... runs at the new clock
    assert inst.step_latency_s == table.lookup("prefill", 1, 2048, 100, 900).latency_s


def test_a_second_clock_change_before_the_first_lands_replaces_it() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=1, clock_change_s=0.05)
    _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    gpu = sim.gpu(0)
    sim._apply_settings(gpu, GpuSettings(clock_mhz=900))
    sim._now = 0.03
    sim._apply_settings(gpu, GpuSettings(clock_mhz=1500))
    sim._now = 0.06  # the first change was due now, but it was replaced
    sim._land_clocks()
    assert gpu.clock_mhz == MAX_CLOCK_MHZ and sim.clock_changes == 0
    sim._apply_settings(gpu, GpuSettings(clock_mhz=1500))  # asked again on the way: the ramp is not restarted
    sim._now = 0.08
    sim._land_clocks()
    assert gpu.clock_mhz == 1500 and sim.clock_changes == 1


def test_a_run_counts_the_clock_changes_a_controller_carries_out() -> None:
    workload = poisson_requests(np.random.default_rng(3), {"llama-3.1-8b": 0.5}, duration_s=300.0)
    result = simulate("festina", workload, gpus_per_node=2)
    assert result.clock_changes > 0
    assert result.as_dict()["clock_changes"] == result.clock_changes


# -- HBM bandwidth shared by co-resident instances --------------------------------------------------


def _two_on_one_gpu(sim: Simulation) -> tuple[SimInstance, SimInstance]:
    a = _ready(sim, StartInstance("llama-3.1-8b", (0,), sm_pct=50.0, memory_fraction=0.45))
    b = _ready(sim, StartInstance("mistral-7b", (0,), sm_pct=50.0, memory_fraction=0.45))
    return a, b


def _alone_decode_s(inst: SimInstance, sim: Simulation) -> float:
    """The decode step's latency from the profile (the instance alone on its GPU) at the run it planned."""
    context = inst.mean_context(inst.steps_planned / 2)
    return inst.table.lookup("decode", inst.decoding, context, inst.sm_pct, sim.gpu(inst.gpus[0]).clock_mhz).latency_s


def test_two_decoders_on_one_gpu_each_run_slower_than_one_alone() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=1, models=["mistral-7b"])
    a, b = _two_on_one_gpu(sim)
    _queue(b, 48, 1500, 400)
    _until_decoding(sim, b)
    assert b.step_latency_s == _alone_decode_s(b, sim)  # nothing else streams yet
    _queue(a, 48, 1500, 400, first_id=100)
    events = sim._next_step(a)
    cut = [e for e in events if e.payload == b.id]
    assert cut, "b's decode run, timed without a, ends at its next step boundary"
    _until_decoding(sim, a)
    alone_s = _alone_decode_s(a, sim)
    assert a.step_latency_s > 1.03 * alone_s
    # At most the co-resident's HBM load times the step (its memory time is at most the step).
    assert a.step_latency_s < (1.0 + b.hbm_load) * alone_s
    sim._now = max(sim._now, cut[0].time_s)
    sim._step_done(b)  # b starts again, now timed with a streaming
    assert b.activity is Activity.DECODE and b.step_latency_s > 1.03 * _alone_decode_s(b, sim)


def test_a_stretched_step_keeps_its_dynamic_energy() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=1, models=["mistral-7b"])
    a, b = _two_on_one_gpu(sim)
    _queue(b, 48, 1500, 400)
    _until_decoding(sim, b)
    _queue(a, 48, 1500, 400, first_id=100)
    _until_decoding(sim, a)
    context = a.mean_context(a.steps_planned / 2)
    alone = a.table.lookup("decode", a.decoding, context, a.sm_pct, MAX_CLOCK_MHZ)
    idle_w = sim.spec.idle_w
    assert a.step_latency_s > alone.latency_s
    assert a.dynamic_w * a.step_latency_s == pytest.approx((alone.power_w - idle_w) * alone.latency_s, rel=1e-12)


def test_a_prefill_beside_a_decoder_barely_slows() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=1, models=["mistral-7b"])
    a, b = _two_on_one_gpu(sim)
    _queue(b, 48, 1500, 400)
    _until_decoding(sim, b)
    _queue(a, 1, 2048, 2, first_id=100)
    sim._next_step(a)
    alone_s = a.table.lookup("prefill", 1, 2048, a.sm_pct, MAX_CLOCK_MHZ).latency_s
    assert b.hbm_load > 0.2  # the decoder does load the HBM ...
    assert alone_s < a.step_latency_s < 1.01 * alone_s  # ... but a compute-bound prefill hardly notices


def test_a_lone_instance_is_unchanged_by_decoders_on_other_gpus() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=2, models=["mistral-7b"])
    a = _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    b = _ready(sim, StartInstance("mistral-7b", (1,)))
    _queue(b, 48, 1500, 400)
    _until_decoding(sim, b)
    _queue(a, 48, 1500, 400, first_id=100)
    _until_decoding(sim, a)
    assert a.step_latency_s == _alone_decode_s(a, sim)
    assert b.step_latency_s == _alone_decode_s(b, sim)


# -- idle power with a loaded model -------------------------------------------------------------------


def test_a_gpu_with_a_ready_idle_instance_draws_more_than_an_empty_powered_gpu() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=2)
    _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    spec = sim.spec
    assert spec.idle_with_context_w > spec.idle_w
    assert sim.gpu(0).power_w == spec.idle_with_context_w and sim.gpu(1).power_w == spec.idle_w
    sim._now = 100.0
    _, parts = sim._total_energy_j()
    assert sim.gpu(0).energy_idle_j == pytest.approx(spec.idle_with_context_w * 100.0)
    assert sim.gpu(1).energy_idle_j == pytest.approx(spec.idle_w * 100.0)
    assert parts["gpu_idle_j"] == pytest.approx((spec.idle_with_context_w + spec.idle_w) * 100.0)


def test_the_context_idle_power_ends_with_the_instance() -> None:
    sim = simulation("vllm", [request()], gpus_per_node=1)
    inst = _ready(sim, StartInstance("llama-3.1-8b", (0,)))
    sim._now = 10.0
    sim._stop(inst)  # idle and empty: removed at once
    assert not sim.gpu(0).instances and sim.gpu(0).power_w == sim.spec.idle_w


def test_calibration_doc_holds_the_hardware_costs_section_it_renders() -> None:
    from festina_hpc.profiles.calibration_doc import HARDWARE_COSTS
    from tests.conftest import REPO_PROFILES

    assert HARDWARE_COSTS[0] == "## Hardware costs in the simulator"
    assert "\n".join(HARDWARE_COSTS) in (REPO_PROFILES / "CALIBRATION.md").read_text(encoding="utf-8")
