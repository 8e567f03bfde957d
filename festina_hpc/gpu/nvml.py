"""The NVML backend: real NVIDIA GPUs through pynvml, in the project's units and exceptions.

NVML speaks milliwatts, millijoules and integer error codes; this module turns
them into watts, joules and the project's ``GpuError`` family, with every
vendor error mapped in one function (``map_nvml_error``). The pynvml module
is imported when a backend is built, never at import time, and can be
injected so that tests drive a fake NVML. Locking clocks needs root: without
it the backend warns once, leaves the default clocks and answers ``None``, so
a node without the privilege still reads power and energy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from festina_hpc.errors import GpuError, GpuLostError, GpuNotSupportedError, GpuPermissionError
from festina_hpc.gpu.base import GpuInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")


def map_nvml_error(nvml: Any, exc: Exception, index: int | None, operation: str) -> GpuError:
    """The project exception for an ``NVMLError``; its one-line message names the GPU and the operation."""
    code = getattr(exc, "value", None)
    where = "NVML" if index is None else f"GPU {index}"
    detail = " ".join(str(exc).split()) or "no detail"
    message = f"{where}: {operation} failed: {detail} (NVML error {code})"
    if code == nvml.NVML_ERROR_NO_PERMISSION:
        return GpuPermissionError(message)
    if code == nvml.NVML_ERROR_NOT_SUPPORTED:
        return GpuNotSupportedError(message)
    if code == nvml.NVML_ERROR_GPU_IS_LOST:
        return GpuLostError(message)
    return GpuError(message)


def nearest_clock_mhz(supported_mhz: Sequence[int], clock_mhz: float) -> int:
    """The supported clock closest to ``clock_mhz``; a tie goes to the higher clock."""
    if not supported_mhz:
        raise GpuError("no supported clocks to choose from")
    return min(supported_mhz, key=lambda c: (abs(c - clock_mhz), -c))


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes for names and UUIDs.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class NvmlBackend:
    """``GpuBackend`` over pynvml; ``close()`` (or ``with``) shuts NVML down."""

    def __init__(self, pynvml_module: Any | None = None):
        if pynvml_module is None:
            import pynvml

            pynvml_module = pynvml
        self._nvml = pynvml_module
        self._call(None, "initialise NVML", self._nvml.nvmlInit)
        self._open = True
        self._handles: dict[int, Any] = {}
        self._clocks_mhz: dict[int, tuple[int, ...]] = {}
        # Set once a clock lock was refused: the warning is given once and later locks are not retried.
        self._clock_lock_denied = False
        try:
            self._count = int(self._call(None, "count devices", self._nvml.nvmlDeviceGetCount))
        except GpuError:
            self.close()
            raise

    # -- plumbing ----------------------------------------------------------------------------

    def _call(self, index: int | None, operation: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            raise map_nvml_error(self._nvml, exc, index, operation) from exc

    def _handle(self, index: int) -> Any:
        if not self._open:
            raise GpuError(f"GPU {index}: NVML backend is closed")
        if index not in self._handles:
            if not 0 <= index < self._count:
                raise GpuError(f"GPU {index}: no such GPU (this node has {self._count})")
            self._handles[index] = self._call(index, "get device handle", self._nvml.nvmlDeviceGetHandleByIndex,
                                              index)
        return self._handles[index]

    def close(self) -> None:
        """Shut NVML down; idempotent."""
        if getattr(self, "_open", False):
            self._open = False
            self._call(None, "shut down NVML", self._nvml.nvmlShutdown)

    def __enter__(self) -> NvmlBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- readings ----------------------------------------------------------------------------

    def device_count(self) -> int:
        return self._count

    def info(self, index: int) -> GpuInfo:
        h = self._handle(index)
        name = _text(self._call(index, "read name", self._nvml.nvmlDeviceGetName, h))
        uuid = _text(self._call(index, "read UUID", self._nvml.nvmlDeviceGetUUID, h))
        memory = self._call(index, "read memory info", self._nvml.nvmlDeviceGetMemoryInfo, h)
        default_limit_mw = self._call(index, "read default power limit",
                                      self._nvml.nvmlDeviceGetPowerManagementDefaultLimit, h)
        return GpuInfo(index=index, name=name, uuid=uuid, memory_total_bytes=int(memory.total),
                       tdp_w=default_limit_mw / 1000.0)

    def power_w(self, index: int) -> float:
        return self._call(index, "read power", self._nvml.nvmlDeviceGetPowerUsage, self._handle(index)) / 1000.0

    def energy_j(self, index: int) -> float:
        h = self._handle(index)
        return self._call(index, "read energy counter", self._nvml.nvmlDeviceGetTotalEnergyConsumption, h) / 1000.0

    def memory_used_bytes(self, index: int) -> int:
        memory = self._call(index, "read memory info", self._nvml.nvmlDeviceGetMemoryInfo, self._handle(index))
        return int(memory.used)

    def supported_clocks_mhz(self, index: int) -> Sequence[int]:
        if index not in self._clocks_mhz:
            h = self._handle(index)
            memory_clocks = self._call(index, "read supported memory clocks",
                                       self._nvml.nvmlDeviceGetSupportedMemoryClocks, h)
            if not memory_clocks:
                raise GpuNotSupportedError(f"GPU {index}: read supported memory clocks failed: none reported")
            clocks = self._call(index, "read supported SM clocks", self._nvml.nvmlDeviceGetSupportedGraphicsClocks,
                                h, max(memory_clocks))
            self._clocks_mhz[index] = tuple(sorted({int(c) for c in clocks}, reverse=True))
        return self._clocks_mhz[index]

    def current_clock_mhz(self, index: int) -> int:
        h = self._handle(index)
        return int(self._call(index, "read SM clock", self._nvml.nvmlDeviceGetClockInfo, h, self._nvml.NVML_CLOCK_SM))

    def power_limit_w(self, index: int) -> float:
        h = self._handle(index)
        return self._call(index, "read power limit", self._nvml.nvmlDeviceGetPowerManagementLimit, h) / 1000.0

    # -- settings ----------------------------------------------------------------------------

    def lock_clocks(self, index: int, clock_mhz: int) -> int | None:
        """Lock the SM clock to the supported clock nearest ``clock_mhz``; ``None`` without the privilege."""
        if clock_mhz <= 0:
            raise GpuError(f"GPU {index}: lock clocks: clock_mhz = {clock_mhz} must be positive")
        if self._clock_lock_denied:
            return None
        h = self._handle(index)
        target_mhz = nearest_clock_mhz(self.supported_clocks_mhz(index), clock_mhz)
        current_mhz = self.current_clock_mhz(index)
        try:
            self._call(index, f"lock SM clock at {target_mhz} MHz", self._nvml.nvmlDeviceSetGpuLockedClocks,
                       h, target_mhz, target_mhz)
        except GpuPermissionError as exc:
            self._clock_lock_denied = True
            logger.warning("%s; keeping default clocks (SM clock now %d MHz). Locking clocks needs root; "
                           "festina goes on without it.", exc, current_mhz)
            return None
        logger.debug("GPU %d: SM clock locked at %d MHz (was %d MHz)", index, target_mhz, current_mhz)
        return target_mhz

    def reset_clocks(self, index: int) -> None:
        """Unlock the SM clock; a no-op once locking was refused, since nothing was locked then."""
        h = self._handle(index)
        if self._clock_lock_denied:
            return
        self._call(index, "reset SM clock lock", self._nvml.nvmlDeviceResetGpuLockedClocks, h)

    def set_power_limit_w(self, index: int, power_w: float) -> None:
        if not math.isfinite(power_w) or power_w <= 0:
            raise GpuError(f"GPU {index}: set power limit: power_w = {power_w!r} must be a positive number")
        h = self._handle(index)
        target_mw = int(round(power_w * 1000.0))
        current_mw = self._call(index, "read power limit", self._nvml.nvmlDeviceGetPowerManagementLimit, h)
        if current_mw == target_mw:
            return
        self._call(index, f"set power limit to {power_w:g} W", self._nvml.nvmlDeviceSetPowerManagementLimit,
                   h, target_mw)
