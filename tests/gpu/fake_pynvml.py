"""A fake of the pynvml module at the NVML boundary: devices as plain state, failures set per test.

It exposes what ``NvmlBackend`` calls (the ``nvml*`` functions, ``NVMLError``
with ``.value`` and the ``NVML_*`` constants) in NVML's own units (mW, mJ,
MHz). ``fail(function, code)`` makes one function raise; ``lost = True``
makes every device call raise ``NVML_ERROR_GPU_IS_LOST``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_CLOCK_SM = 1

_MESSAGES = {NVML_ERROR_NOT_SUPPORTED: "Not Supported", NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
             NVML_ERROR_GPU_IS_LOST: "GPU is lost", NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
             NVML_ERROR_UNKNOWN: "Unknown Error"}


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


H100_CLOCKS_MHZ = list(range(1980, 344, -15))


@dataclass
class FakeDevice:
    name: str | bytes = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-0b5c1a7e-0000-4000-8000-000000000000"
    memory_total_bytes: int = 80 * 2**30
    memory_used_bytes: int = 3 * 2**30
    power_mw: int = 123_456
    energy_mj: int = 5_000_123
    energy_step_mj: int = 0  # added to the counter after every reading
    default_clock_mhz: int = 1755
    sm_clock_mhz: int = 1755
    default_limit_mw: int = 700_000
    limit_mw: int = 700_000
    memory_clocks_mhz: list[int] = field(default_factory=lambda: [1593, 2619])
    graphics_clocks_mhz: dict[int, list[int]] = field(
        default_factory=lambda: {2619: H100_CLOCKS_MHZ + [1980], 1593: [1410, 1200]})
    locked_mhz: tuple[int, int] | None = None


class FakeNvml:
    """Passed to ``NvmlBackend(pynvml_module=...)`` in place of pynvml."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    NVML_CLOCK_SM = NVML_CLOCK_SM

    def __init__(self, devices: list[FakeDevice] | None = None):
        self.devices = [FakeDevice()] if devices is None else devices
        self.failures: dict[str, int] = {}
        self.lost = False
        self.calls: list[str] = []
        self.initialised = 0

    def fail(self, function: str, code: int) -> None:
        self.failures[function] = code

    def _enter(self, function: str, device_call: bool = True) -> None:
        self.calls.append(function)
        if function in self.failures:
            raise NVMLError(self.failures[function])
        if device_call and self.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)

    def nvmlInit(self) -> None:
        self._enter("nvmlInit", device_call=False)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown", device_call=False)
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount", device_call=False)
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._enter("nvmlDeviceGetHandleByIndex")
        return self.devices[index]

    def nvmlDeviceGetName(self, h: FakeDevice) -> str | bytes:
        self._enter("nvmlDeviceGetName")
        return h.name

    def nvmlDeviceGetUUID(self, h: FakeDevice) -> str:
        self._enter("nvmlDeviceGetUUID")
        return h.uuid

    def nvmlDeviceGetMemoryInfo(self, h: FakeDevice) -> Any:
        self._enter("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=h.memory_total_bytes, used=h.memory_used_bytes,
                               free=h.memory_total_bytes - h.memory_used_bytes)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: FakeDevice) -> int:
        self._enter("nvmlDeviceGetPowerManagementDefaultLimit")
        return h.default_limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, h: FakeDevice) -> int:
        self._enter("nvmlDeviceGetPowerManagementLimit")
        return h.limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, h: FakeDevice, limit_mw: int) -> None:
        self._enter("nvmlDeviceSetPowerManagementLimit")
        h.limit_mw = limit_mw

    def nvmlDeviceGetPowerUsage(self, h: FakeDevice) -> int:
        self._enter("nvmlDeviceGetPowerUsage")
        return h.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeDevice) -> int:
        self._enter("nvmlDeviceGetTotalEnergyConsumption")
        reading = h.energy_mj
        h.energy_mj += h.energy_step_mj
        return reading

    def nvmlDeviceGetSupportedMemoryClocks(self, h: FakeDevice) -> list[int]:
        self._enter("nvmlDeviceGetSupportedMemoryClocks")
        return list(h.memory_clocks_mhz)

    def nvmlDeviceGetSupportedGraphicsClocks(self, h: FakeDevice, memory_clock_mhz: int) -> list[int]:
        self._enter("nvmlDeviceGetSupportedGraphicsClocks")
        return list(h.graphics_clocks_mhz[memory_clock_mhz])

    def nvmlDeviceGetClockInfo(self, h: FakeDevice, clock_type: int) -> int:
        self._enter("nvmlDeviceGetClockInfo")
        assert clock_type == NVML_CLOCK_SM
        return h.sm_clock_mhz

    def nvmlDeviceSetGpuLockedClocks(self, h: FakeDevice, min_mhz: int, max_mhz: int) -> None:
        self._enter("nvmlDeviceSetGpuLockedClocks")
        h.locked_mhz = (min_mhz, max_mhz)
        h.sm_clock_mhz = max_mhz

    def nvmlDeviceResetGpuLockedClocks(self, h: FakeDevice) -> None:
        self._enter("nvmlDeviceResetGpuLockedClocks")
        h.locked_mhz = None
        h.sm_clock_mhz = h.default_clock_mhz
