from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from festina_hpc.errors import GpuError, GpuLostError, GpuNotSupportedError, GpuPermissionError
from festina_hpc.gpu.nvml import NvmlBackend, map_nvml_error, nearest_clock_mhz
from tests.gpu import fake_pynvml
from tests.gpu.fake_pynvml import FakeDevice, FakeNvml


def make_backend(*devices: FakeDevice) -> tuple[NvmlBackend, FakeNvml]:
    nvml = FakeNvml(list(devices) or None)
    return NvmlBackend(pynvml_module=nvml), nvml


def lock_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "festina_hpc.gpu.nvml" and r.levelno == logging.WARNING]


def test_readings_in_project_units() -> None:
    backend, _ = make_backend(FakeDevice(power_mw=123_456, energy_mj=5_000_123, memory_used_bytes=7 * 2**30))
    assert backend.device_count() == 1
    assert backend.power_w(0) == pytest.approx(123.456)
    assert backend.energy_j(0) == pytest.approx(5000.123)
    assert backend.memory_used_bytes(0) == 7 * 2**30
    assert backend.power_limit_w(0) == pytest.approx(700.0)
    assert backend.current_clock_mhz(0) == 1755


def test_info_decodes_bytes_names() -> None:
    backend, _ = make_backend(FakeDevice(name=b"NVIDIA H100 80GB HBM3", default_limit_mw=650_000))
    info = backend.info(0)
    assert info.name == "NVIDIA H100 80GB HBM3"
    assert info.uuid.startswith("GPU-")
    assert info.memory_total_bytes == 80 * 2**30
    assert info.tdp_w == pytest.approx(650.0)


def test_supported_clocks_at_highest_memory_clock_highest_first_without_duplicates() -> None:
    backend, _ = make_backend()
    clocks = backend.supported_clocks_mhz(0)
    assert clocks[0] == 1980 and clocks[-1] == 345
    assert list(clocks) == sorted(set(clocks), reverse=True)


@pytest.mark.parametrize("case,supported,requested,expected", [
    ("exact", [1980, 1500, 900], 1500, 1500),
    ("nearest below", [1980, 1500, 900], 1450, 1500),
    ("tie goes up", [1010, 1000], 1005, 1010),
    ("above max", [1980, 1500], 2500, 1980),
    ("below min", [1980, 345], 100, 345),
])
def test_nearest_clock(case: str, supported: list[int], requested: int, expected: int) -> None:
    assert nearest_clock_mhz(supported, requested) == expected


def test_lock_snaps_to_a_supported_clock_and_reset_unlocks() -> None:
    backend, nvml = make_backend()
    assert backend.lock_clocks(0, 1234) == 1230
    assert nvml.devices[0].locked_mhz == (1230, 1230)
    assert backend.current_clock_mhz(0) == 1230
    backend.reset_clocks(0)
    assert nvml.devices[0].locked_mhz is None
    assert backend.current_clock_mhz(0) == 1755


def test_lock_reads_the_current_clock_before_setting() -> None:
    backend, nvml = make_backend()
    backend.lock_clocks(0, 1500)
    assert nvml.calls.index("nvmlDeviceGetClockInfo") < nvml.calls.index("nvmlDeviceSetGpuLockedClocks")


def test_no_permission_to_lock_warns_once_keeps_default_clocks_and_keeps_working(
        caplog: pytest.LogCaptureFixture) -> None:
    backend, nvml = make_backend()
    nvml.fail("nvmlDeviceSetGpuLockedClocks", fake_pynvml.NVML_ERROR_NO_PERMISSION)
    with caplog.at_level(logging.WARNING):
        assert backend.lock_clocks(0, 1500) is None
        assert backend.lock_clocks(0, 1200) is None
        backend.reset_clocks(0)
    warnings = lock_warnings(caplog)
    assert len(warnings) == 1
    assert "GPU 0" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    assert nvml.calls.count("nvmlDeviceSetGpuLockedClocks") == 1
    assert nvml.devices[0].locked_mhz is None
    assert backend.current_clock_mhz(0) == 1755
    assert backend.power_w(0) == pytest.approx(123.456)
    assert backend.energy_j(0) == pytest.approx(5000.123)


def test_the_lock_warning_is_per_backend_instance(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            backend, nvml = make_backend()
            nvml.fail("nvmlDeviceSetGpuLockedClocks", fake_pynvml.NVML_ERROR_NO_PERMISSION)
            backend.lock_clocks(0, 1500)
            backend.lock_clocks(0, 1500)
    assert len(lock_warnings(caplog)) == 2


def test_lock_not_supported_raises() -> None:
    backend, nvml = make_backend()
    nvml.fail("nvmlDeviceSetGpuLockedClocks", fake_pynvml.NVML_ERROR_NOT_SUPPORTED)
    with pytest.raises(GpuNotSupportedError, match=r"^GPU 0: lock SM clock at 1500 MHz failed: Not Supported"):
        backend.lock_clocks(0, 1500)


@pytest.mark.parametrize("operation", [
    lambda b: b.power_w(0),
    lambda b: b.energy_j(0),
    lambda b: b.memory_used_bytes(0),
    lambda b: b.info(0),
    lambda b: b.current_clock_mhz(0),
    lambda b: b.lock_clocks(0, 1500),
    lambda b: b.reset_clocks(0),
    lambda b: b.set_power_limit_w(0, 400),
])
def test_a_lost_gpu_raises_gpu_lost_from_any_call(operation: Callable[[NvmlBackend], object]) -> None:
    backend, nvml = make_backend()
    backend.power_w(0)  # the handle is cached before the GPU falls off the bus
    nvml.lost = True
    with pytest.raises(GpuLostError, match=r"^GPU 0: .* failed: GPU is lost \(NVML error 15\)$"):
        operation(backend)


@pytest.mark.parametrize("code,expected", [
    (fake_pynvml.NVML_ERROR_NO_PERMISSION, GpuPermissionError),
    (fake_pynvml.NVML_ERROR_NOT_SUPPORTED, GpuNotSupportedError),
    (fake_pynvml.NVML_ERROR_GPU_IS_LOST, GpuLostError),
    (fake_pynvml.NVML_ERROR_UNKNOWN, GpuError),
])
def test_error_mapping(code: int, expected: type[GpuError]) -> None:
    error = map_nvml_error(FakeNvml(), fake_pynvml.NVMLError(code), 3, "read power")
    assert type(error) is expected
    assert str(error).startswith("GPU 3: read power failed: ")


def test_permission_error_on_power_limit_is_raised() -> None:
    backend, nvml = make_backend()
    nvml.fail("nvmlDeviceSetPowerManagementLimit", fake_pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(GpuPermissionError, match="set power limit to 400 W"):
        backend.set_power_limit_w(0, 400)


def test_set_power_limit_in_milliwatts_and_skips_an_unchanged_limit() -> None:
    backend, nvml = make_backend()
    backend.set_power_limit_w(0, 300.5)
    assert nvml.devices[0].limit_mw == 300_500
    assert backend.power_limit_w(0) == pytest.approx(300.5)
    backend.set_power_limit_w(0, 300.5)
    assert nvml.calls.count("nvmlDeviceSetPowerManagementLimit") == 1
    with pytest.raises(GpuError, match="must be a positive number"):
        backend.set_power_limit_w(0, -1)


def test_init_failure_is_a_gpu_error() -> None:
    nvml = FakeNvml()
    nvml.fail("nvmlInit", fake_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(GpuError, match=r"^NVML: initialise NVML failed: NVML Shared Library Not Found"):
        NvmlBackend(pynvml_module=nvml)


def test_unknown_index_and_closed_backend() -> None:
    backend, nvml = make_backend()
    with pytest.raises(GpuError, match=r"^GPU 5: no such GPU \(this node has 1\)"):
        backend.power_w(5)
    backend.close()
    backend.close()
    assert nvml.initialised == 0
    assert nvml.calls.count("nvmlShutdown") == 1
    with pytest.raises(GpuError, match="closed"):
        backend.power_w(0)
