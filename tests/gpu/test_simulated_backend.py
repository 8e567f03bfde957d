from __future__ import annotations

import pytest

from festina_hpc.errors import GpuError, UnknownProfileError
from festina_hpc.gpu.base import Workload
from festina_hpc.gpu.simulated import ManualClock, SimulatedGpuBackend
from festina_hpc.profiles.store import ProfileStore
from tests.conftest import IDLE_W, SYNTHETIC_GPU, SYNTHETIC_MODEL, synthetic_point

GIB = 2**30


def make_gpu(store: ProfileStore, count: int = 2) -> tuple[SimulatedGpuBackend, ManualClock]:
    clock = ManualClock(100.0)
    return SimulatedGpuBackend(store, SYNTHETIC_GPU, count, clock), clock


def workload(phase: str = "decode", batch: int = 8, context_tokens: int = 2048, sm_pct: float = 100.0) -> Workload:
    return Workload(SYNTHETIC_MODEL, phase, batch, context_tokens, sm_pct)


def test_idle_gpu_draws_idle_power_at_max_clock_and_tdp_limit(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    assert gpu.device_count() == 2
    assert gpu.power_w(0) == IDLE_W
    assert gpu.current_clock_mhz(0) == 1980
    assert gpu.power_limit_w(0) == 700.0
    assert gpu.memory_used_bytes(0) == 0


def test_one_workload_draws_its_profile_power(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    gpu.set_workloads(0, [workload("prefill", 8, 512, 50)])
    assert gpu.power_w(0) == pytest.approx(synthetic_point("prefill", 8, 512, 50, 1980)[1], rel=1e-4)
    assert gpu.power_w(1) == IDLE_W
    assert gpu.workloads(0) == (workload("prefill", 8, 512, 50),)


def test_power_rises_with_workload_and_clock(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    idle_w = gpu.power_w(0)
    gpu.set_workloads(0, [workload("decode", 8)])
    decode_w = gpu.power_w(0)
    gpu.set_workloads(0, [workload("decode", 8), workload("decode", 64)])
    two_w = gpu.power_w(0)
    assert idle_w < decode_w < two_w
    # Co-resident instances add their dynamic power to one idle floor.
    expected = IDLE_W + sum(synthetic_point("decode", b, 2048, 100, 1980)[1] - IDLE_W for b in (8, 64))
    assert two_w == pytest.approx(expected, rel=1e-4)
    gpu.lock_clocks(0, 1500)
    assert gpu.power_w(0) < two_w


def test_lower_clock_lowers_decode_power_more_than_it_slows_decode(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    decode = workload("decode", 8)
    gpu.set_workloads(0, [decode])
    fast_w, fast_s = gpu.power_w(0), gpu.step_latency_s(0, decode)
    gpu.lock_clocks(0, 1500)
    slow_w, slow_s = gpu.power_w(0), gpu.step_latency_s(0, decode)
    assert slow_w < fast_w
    assert slow_s / fast_s < 1.05
    assert slow_w * slow_s < fast_w * fast_s  # less energy per token


def test_energy_counter_integrates_power_piecewise(synthetic_store: ProfileStore) -> None:
    gpu, clock = make_gpu(synthetic_store)
    start_j = gpu.energy_j(0)
    clock.advance(10.0)
    assert gpu.energy_j(0) - start_j == pytest.approx(10.0 * IDLE_W)
    gpu.set_workloads(0, [workload("prefill", 8, 512)])
    busy_w = gpu.power_w(0)
    clock.advance(2.0)
    gpu.lock_clocks(0, 900)
    slow_w = gpu.power_w(0)
    clock.advance(3.0)
    gpu.set_workloads(0, [])
    clock.advance(1.0)
    expected_j = 10.0 * IDLE_W + 2.0 * busy_w + 3.0 * slow_w + 1.0 * IDLE_W
    assert gpu.energy_j(0) - start_j == pytest.approx(expected_j)
    assert gpu.energy_j(1) - start_j == pytest.approx(16.0 * IDLE_W)
    # Reading does not change the counter; it never goes down.
    assert gpu.energy_j(0) == gpu.energy_j(0)


def test_power_limit_caps_power_and_stretches_steps_at_equal_energy(synthetic_store: ProfileStore) -> None:
    gpu, clock = make_gpu(synthetic_store)
    prefill = workload("prefill", 8, 512)
    gpu.set_workloads(0, [prefill])
    free_w, free_s = gpu.power_w(0), gpu.step_latency_s(0, prefill)
    assert free_w > 300
    gpu.set_power_limit_w(0, 300)
    assert gpu.power_w(0) == 300
    capped_s = gpu.step_latency_s(0, prefill)
    assert capped_s > free_s
    assert 300 * capped_s == pytest.approx(free_w * free_s)
    start_j = gpu.energy_j(0)
    clock.advance(1.0)
    assert gpu.energy_j(0) - start_j == pytest.approx(300.0)
    with pytest.raises(GpuError, match=r"^GPU 0: set power limit: power_w = 900 must be in \(0, 700\] W$"):
        gpu.set_power_limit_w(0, 900)


def test_memory_is_weights_plus_kv_cache_per_workload(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    model = synthetic_store.model(SYNTHETIC_MODEL)
    gpu.set_workloads(0, [workload("decode", 8, 2048), workload("prefill", 1, 512)])
    expected = 2 * model.weights_bytes + (8 * 2048 + 512) * model.kv_bytes_per_token
    assert gpu.memory_used_bytes(0) == pytest.approx(expected, abs=2)
    assert gpu.memory_used_bytes(1) == 0


def test_workloads_that_do_not_fit_are_refused_like_an_out_of_memory(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    with pytest.raises(GpuError, match=r"^GPU 0: out of memory: workloads need .* GiB, the GPU has 80 GiB$"):
        gpu.set_workloads(0, [workload("decode", 64, 200_000)])
    assert gpu.workloads(0) == ()


def test_workloads_outside_the_table_answer_at_its_edge(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    outside = workload("decode", 128, 4096, 25)
    gpu.set_workloads(0, [outside])
    edge = synthetic_point("decode", 64, 2048, 50, 1980)
    # The table file keeps 5-6 significant digits.
    assert gpu.power_w(0) == pytest.approx(edge[1], rel=1e-4)
    assert gpu.step_latency_s(0, outside) == pytest.approx(edge[0], rel=1e-4)


def test_bad_workloads_are_refused(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    with pytest.raises(GpuError, match="phase = 'train'"):
        gpu.set_workloads(0, [workload("train")])
    with pytest.raises(GpuError, match="must be positive"):
        gpu.set_workloads(0, [workload(batch=0)])
    with pytest.raises(UnknownProfileError, match="no profile for model mistral-7b"):
        gpu.set_workloads(0, [Workload("mistral-7b", "decode", 1, 512)])


def test_lock_snaps_to_supported_clock_and_reset_returns_to_max(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    assert gpu.lock_clocks(0, 1234) == 1230
    assert gpu.current_clock_mhz(0) == 1230
    assert gpu.lock_clocks(0, 5000) == 1980
    assert gpu.lock_clocks(1, 10) == 345
    gpu.reset_clocks(1)
    assert gpu.current_clock_mhz(1) == 1980
    assert gpu.supported_clocks_mhz(0)[0] == 1980


def test_info_resolves_to_the_gpu_spec_like_a_real_gpu(synthetic_store: ProfileStore) -> None:
    gpu, _ = make_gpu(synthetic_store)
    info = gpu.info(1)
    assert info.name == "NVIDIA H100 80GB HBM3"
    assert synthetic_store.gpu(info.name).name == SYNTHETIC_GPU
    assert info.uuid.startswith("GPU-") and info.uuid != gpu.info(0).uuid
    assert info.tdp_w == 700.0
    with pytest.raises(GpuError, match=r"^GPU 2: no such GPU"):
        gpu.power_w(2)
