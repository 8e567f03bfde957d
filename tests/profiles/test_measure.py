from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pytest

from festina_hpc.errors import GpuError, GpuNotSupportedError, GpuPermissionError, ProfileError
from festina_hpc.gpu.nvml import NvmlBackend
from festina_hpc.gpu.simulated import ManualClock, SimulatedGpuBackend, SimulatedMps
from festina_hpc.profiles.measure import (
    Measurement,
    SimulatedStepRunner,
    TorchStepRunner,
    measure_table,
    step_runner,
)
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.profiles.table import PHASES, ProfileTable
from tests.conftest import SYNTHETIC_GPU, SYNTHETIC_MODEL
from tests.gpu.fake_pynvml import FakeDevice, FakeNvml

FAKE_WORKER = [sys.executable, str(Path(__file__).with_name("fake_torch_worker.py"))]
GPU_UUID = "GPU-0b5c1a7e-0000-4000-8000-000000000000"


class RecordingGpu(SimulatedGpuBackend):
    """A simulated GPU that counts clock resets."""

    resets = 0

    def reset_clocks(self, index: int) -> None:
        self.resets += 1
        super().reset_clocks(index)


class NoClockPermissionGpu(RecordingGpu):
    """A simulated GPU on which locking clocks is not permitted (as NvmlBackend answers then)."""

    def lock_clocks(self, index: int, clock_mhz: int) -> int | None:
        return None


def simulated_measurement(store: ProfileStore, gpu: SimulatedGpuBackend, clock: ManualClock,
                          clocks_mhz: tuple[int, ...] = (900, 1980)) -> Measurement:
    model = store.model(SYNTHETIC_MODEL)
    runner = SimulatedStepRunner(gpu, 0, model.name, clock)
    return measure_table(gpu, 0, store.gpu(SYNTHETIC_GPU), model, 1, [1, 64], [512, 2048], [50, 100], clocks_mhz,
                         runner, clock.now, notes=["backend: simulated (test)"])


def test_measuring_a_simulated_gpu_reproduces_the_source_table(synthetic_store: ProfileStore,
                                                                tmp_path: Path) -> None:
    clock = ManualClock()
    gpu = RecordingGpu(synthetic_store, SYNTHETIC_GPU, 1, clock)
    result = simulated_measurement(synthetic_store, gpu, clock)
    source = synthetic_store.table(SYNTHETIC_GPU, SYNTHETIC_MODEL)
    assert len(result.points) == 2 * 2 * 2 * 2 * 2
    for point in result.points:
        expected = source.lookup(point.phase, point.batch, point.context_tokens, point.sm_pct, point.clock_mhz)
        assert point.latency_s == pytest.approx(expected.latency_s, rel=0.01)
        assert point.power_w == pytest.approx(expected.power_w, rel=0.01)
    assert result.measured_s == pytest.approx(sum(p.latency_s for p in result.points))

    path = tmp_path / "measured.csv"
    result.table.to_csv(path)
    table = ProfileTable.from_csv(path)
    assert (table.gpu, table.model, table.tp) == (SYNTHETIC_GPU, SYNTHETIC_MODEL, 1)
    assert table.axes == ((1.0, 64.0), (512.0, 2048.0), (50.0, 100.0), (900.0, 1980.0))
    for phase, batch, context, sm, clk in itertools.product(PHASES, *table.axes):
        got, want = table.lookup(phase, batch, context, sm, clk), source.lookup(phase, batch, context, sm, clk)
        assert got.latency_s == pytest.approx(want.latency_s, rel=0.01)
        assert got.power_w == pytest.approx(want.power_w, rel=0.01)
    assert table.notes[0] == "measured with festina profiles measure on GPU 0: NVIDIA H100 80GB HBM3"
    assert "backend: simulated (test)" in table.notes
    assert gpu.resets == 1 and gpu.current_clock_mhz(0) == 1980
    assert gpu.workloads(0) == ()


def test_requested_clocks_snap_to_supported_clocks(synthetic_store: ProfileStore) -> None:
    clock = ManualClock()
    gpu = RecordingGpu(synthetic_store, SYNTHETIC_GPU, 1, clock)
    result = simulated_measurement(synthetic_store, gpu, clock, clocks_mhz=(1234, 1979))
    assert result.table.axes[3] == (1230.0, 1980.0)


def test_no_permission_to_lock_clocks_measures_nothing_and_says_why(synthetic_store: ProfileStore) -> None:
    clock = ManualClock()
    gpu = NoClockPermissionGpu(synthetic_store, SYNTHETIC_GPU, 1, clock)
    with pytest.raises(GpuPermissionError, match=r"^GPU 0: cannot lock the SM clock at 1980 MHz \(no permission\); "
                                                 r"measuring a profile over clocks needs root$"):
        simulated_measurement(synthetic_store, gpu, clock)
    assert gpu.resets == 1
    assert clock.now() == 0.0


def test_a_single_clock_gives_a_table_that_answers_at_that_clock(synthetic_store: ProfileStore,
                                                                  tmp_path: Path) -> None:
    """A site that runs only at max clock measures one clock; the table answers there and nowhere else."""
    clock = ManualClock()
    gpu = RecordingGpu(synthetic_store, SYNTHETIC_GPU, 1, clock)
    table = simulated_measurement(synthetic_store, gpu, clock, clocks_mhz=(1980,)).table
    table.to_csv(tmp_path / "one-clock.csv")
    reread = ProfileTable.from_csv(tmp_path / "one-clock.csv")
    source = synthetic_store.table(SYNTHETIC_GPU, SYNTHETIC_MODEL)
    hit = reread.lookup("decode", 8, 1024, 75, 1980)
    want = source.lookup("decode", 8, 1024, 75, 1980)
    assert hit.latency_s == pytest.approx(want.latency_s, rel=0.01)
    assert hit.power_w == pytest.approx(want.power_w, rel=0.01)
    with pytest.raises(ProfileError, match="clock_mhz = 1500 is outside"):
        reread.lookup("decode", 8, 1024, 75, 1500)


def test_clocks_are_reset_when_a_point_fails(synthetic_store: ProfileStore) -> None:
    clock = ManualClock()
    gpu = RecordingGpu(synthetic_store, SYNTHETIC_GPU, 1, clock)
    model = synthetic_store.model(SYNTHETIC_MODEL)
    with pytest.raises(GpuError, match="out of memory"):
        measure_table(gpu, 0, synthetic_store.gpu(SYNTHETIC_GPU), model, 1, [1, 64], [512, 500_000], [100, 50],
                      [900, 1980], SimulatedStepRunner(gpu, 0, model.name, clock), clock.now)
    assert gpu.resets == 1 and gpu.current_clock_mhz(0) == 1980


@pytest.mark.parametrize("batches,contexts,sm_pcts,message", [
    ([1, 8], [0, 2048], [50, 100], "contexts value 0 must be a positive number"),
    ([1, 8], [512, 2048], [50, 150], "sm_pcts value 150 must be at most 100"),
])
def test_bad_grids_are_refused_before_measuring(synthetic_store: ProfileStore, batches: list[int],
                                                contexts: list[int], sm_pcts: list[float], message: str) -> None:
    clock = ManualClock()
    gpu = RecordingGpu(synthetic_store, SYNTHETIC_GPU, 1, clock)
    model = synthetic_store.model(SYNTHETIC_MODEL)
    with pytest.raises(ProfileError, match=message):
        measure_table(gpu, 0, synthetic_store.gpu(SYNTHETIC_GPU), model, 1, batches, contexts, sm_pcts,
                      [900, 1980], SimulatedStepRunner(gpu, 0, model.name, clock), clock.now)
    assert gpu.resets == 0


def test_a_run_that_takes_no_time_is_an_error(synthetic_store: ProfileStore) -> None:
    class InstantRunner:
        def prepare(self, phase: str, batch: int, context_tokens: int, sm_pct: float) -> None:
            pass

        def run(self) -> int:
            return 1

    clock = ManualClock()
    gpu = RecordingGpu(synthetic_store, SYNTHETIC_GPU, 1, clock)
    with pytest.raises(GpuError, match=r"^GPU 0: prefill batch=1 context=512 sm_pct=50 clock=1980: the run took 0 s"):
        measure_table(gpu, 0, synthetic_store.gpu(SYNTHETIC_GPU), synthetic_store.model(SYNTHETIC_MODEL), 1,
                      [1, 8], [512, 2048], [50, 100], [900, 1980], InstantRunner(), clock.now)


# -- the torch runner's process plumbing, with a fake worker ---------------------------------------


def worker_env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "FAKE_WORKER_LOG": str(tmp_path / "worker.log"),
            "CUDA_VISIBLE_DEVICES": "0,1"}


def worker_log(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]


def torch_runner(synthetic_store: ProfileStore, tmp_path: Path,
                 mps_env: dict[str, str] | None = None) -> TorchStepRunner:
    return TorchStepRunner(synthetic_store.model(SYNTHETIC_MODEL), 1, GPU_UUID, mps_env=mps_env,
                           base_env=worker_env(tmp_path), argv=FAKE_WORKER, reply_timeout_s=30)


def test_torch_runner_without_mps_pins_the_gpu_and_runs_at_full_share(synthetic_store: ProfileStore,
                                                                       tmp_path: Path) -> None:
    runner = torch_runner(synthetic_store, tmp_path)
    try:
        runner.prepare("prefill", 8, 512, 100)
        assert runner.run() == 3
        with pytest.raises(GpuNotSupportedError, match="an SM share of 50% needs an MPS daemon"):
            runner.prepare("decode", 8, 512, 50)
    finally:
        runner.close()
        runner.close()
    prepare, run = worker_log(tmp_path)
    assert prepare["visible"] == GPU_UUID and prepare["sm"] is None
    assert prepare["shape"] == {"params_b": 8.03, "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8,
                                "head_dim": 128, "tp": 1}
    assert (prepare["phase"], prepare["batch"], prepare["context_tokens"]) == ("prefill", 8, 512)
    assert run["op"] == "run" and run["pid"] == prepare["pid"]


def test_torch_runner_with_mps_starts_one_client_process_per_share(synthetic_store: ProfileStore,
                                                                    tmp_path: Path) -> None:
    mps_env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log")}
    runner = torch_runner(synthetic_store, tmp_path, mps_env)
    try:
        for phase, sm_pct in (("prefill", 50), ("decode", 50), ("prefill", 100)):
            runner.prepare(phase, 1, 512, sm_pct)
            runner.run()
    finally:
        runner.close()
    prepares = [entry for entry in worker_log(tmp_path) if entry["op"] == "prepare"]
    assert [entry["sm"] for entry in prepares] == ["50", "50", "100"]
    assert prepares[0]["pid"] == prepares[1]["pid"] != prepares[2]["pid"]
    assert all(entry["visible"] is None and entry["pipe"] == str(tmp_path / "pipe") for entry in prepares)


def test_torch_worker_errors_and_crashes_are_one_line_gpu_errors(synthetic_store: ProfileStore,
                                                                  tmp_path: Path) -> None:
    runner = torch_runner(synthetic_store, tmp_path)
    try:
        with pytest.raises(GpuError, match=r"^torch worker: prepare decode batch=999 context=512 failed: the "
                                           r"workload does not fit in GPU memory$"):
            runner.prepare("decode", 999, 512, 100)
        with pytest.raises(GpuError, match=r"^torch worker: exited with status 3 during prepare decode batch=666 "
                                           r"context=512: boom: the worker crashed$"):
            runner.prepare("decode", 666, 512, 100)
    finally:
        runner.close()


class ManualClockTicking:
    """Each reading is one second after the previous one."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        self.now_s += 1.0
        return self.now_s


def test_measuring_through_nvml_with_mps_shares(synthetic_store: ProfileStore, tmp_path: Path) -> None:
    nvml = FakeNvml([FakeDevice(energy_step_mj=2_000)])
    backend = NvmlBackend(nvml)
    mps_env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log")}
    runner = torch_runner(synthetic_store, tmp_path, mps_env)
    try:
        result = measure_table(backend, 0, synthetic_store.gpu(SYNTHETIC_GPU), synthetic_store.model(SYNTHETIC_MODEL),
                               1, [1, 8], [512, 2048], [50, 100], [900, 1980], runner, ManualClockTicking())
    finally:
        runner.close()
    assert len(result.points) == 32
    # Each point: the clock ticks 1 s between the readings and the counter moves 2 J per reading.
    assert {(p.steps, p.elapsed_s, p.energy_j, p.latency_s, p.power_w) for p in result.points} == {
        (3, 1.0, 2.0, 1.0 / 3, 2.0)}
    locks = [c for c in nvml.calls if c == "nvmlDeviceSetGpuLockedClocks"]
    assert len(locks) == 2
    assert nvml.calls.count("nvmlDeviceResetGpuLockedClocks") == 1
    last_reading = max(i for i, c in enumerate(nvml.calls) if c == "nvmlDeviceGetTotalEnergyConsumption")
    assert nvml.calls.index("nvmlDeviceResetGpuLockedClocks") > last_reading
    assert nvml.devices[0].locked_mhz is None


def test_step_runner_uses_virtual_time_for_a_simulated_gpu(synthetic_store: ProfileStore, tmp_path: Path) -> None:
    clock = ManualClock()
    gpu = SimulatedGpuBackend(synthetic_store, SYNTHETIC_GPU, 1, clock)
    mps = SimulatedMps(1)
    with step_runner(gpu, 0, synthetic_store.model(SYNTHETIC_MODEL), 1, [50, 100], clock, mps,
                     tmp_path) as (runner, measuring_clock):
        assert isinstance(runner, SimulatedStepRunner)
        assert measuring_clock() == clock.now()
    assert mps.daemon(0) is None


@pytest.mark.parametrize("sm_pcts,uses_mps", [([50, 100], True), ([100, 100], False)])
def test_step_runner_runs_an_mps_daemon_for_real_shares_below_100(synthetic_store: ProfileStore, tmp_path: Path,
                                                                  sm_pcts: list[float], uses_mps: bool) -> None:
    backend = NvmlBackend(FakeNvml())
    mps = SimulatedMps(1)
    with step_runner(backend, 0, synthetic_store.model(SYNTHETIC_MODEL), 1, sm_pcts, ManualClock(), mps,
                     tmp_path) as (runner, _):
        assert isinstance(runner, TorchStepRunner)
        daemon = mps.daemon(0)
        assert (daemon is not None) == uses_mps
        if daemon is not None:
            assert daemon.pipe_dir == tmp_path / "mps-pipe"
    assert mps.daemon(0) is None
