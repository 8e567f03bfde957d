"""The GPU backend interface: read power and energy, set clocks and power limits, control MPS.

Two backends implement it: ``nvml`` (real NVIDIA GPUs through pynvml) and
``simulated`` (a GPU whose power and energy counter follow the profile model
for the work it is told it runs). Everything above this layer (the node
controller, the profiler, accounting) talks to ``GpuBackend`` only, built in
``main()`` and passed in. Backends never decide anything.

Contracts:
- GPUs are addressed by index (0..device_count()-1, NVML order).
- ``energy_j`` is a monotonically non-decreasing counter in joules since an
  arbitrary origin; callers difference two readings.
- ``lock_clocks`` returns the clock actually applied. Where the process lacks
  the privilege, the NVML backend warns once, leaves default clocks and
  returns ``None``; callers keep working.
- Vendor errors are mapped, in one place per backend, onto
  ``GpuPermissionError``, ``GpuNotSupportedError``, ``GpuLostError`` and
  ``GpuError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str  # the driver's product name, e.g. "NVIDIA H100 80GB HBM3"
    uuid: str
    memory_total_bytes: int
    tdp_w: float  # default power limit


@dataclass(frozen=True)
class Workload:
    """What a simulated GPU is told one co-resident model instance is doing."""

    model: str
    phase: str  # "prefill" or "decode"
    batch: int
    context_tokens: int
    sm_pct: float = 100.0


class GpuBackend(Protocol):
    def device_count(self) -> int: ...

    def info(self, index: int) -> GpuInfo: ...

    def power_w(self, index: int) -> float:
        """Current board power draw."""
        ...

    def energy_j(self, index: int) -> float:
        """Cumulative energy counter."""
        ...

    def memory_used_bytes(self, index: int) -> int: ...

    def supported_clocks_mhz(self, index: int) -> Sequence[int]:
        """Supported SM clocks at the highest memory clock, highest first."""
        ...

    def current_clock_mhz(self, index: int) -> int:
        """Current SM clock."""
        ...

    def lock_clocks(self, index: int, clock_mhz: int) -> int | None:
        """Lock the SM clock (min = max = clock_mhz); the applied clock, or None if not permitted."""
        ...

    def reset_clocks(self, index: int) -> None: ...

    def power_limit_w(self, index: int) -> float: ...

    def set_power_limit_w(self, index: int, power_w: float) -> None: ...


class MpsControl(Protocol):
    """NVIDIA MPS per GPU: one control daemon per GPU, with its own pipe and log directories."""

    def start(self, index: int, pipe_dir: Path, log_dir: Path) -> None:
        """Start the control daemon for GPU ``index``; idempotent."""
        ...

    def running(self, index: int, pipe_dir: Path) -> bool:
        """Whether a control daemon answers on ``pipe_dir`` (whoever started it; a crashed one does not)."""
        ...

    def attach(self, index: int, pipe_dir: Path, log_dir: Path) -> None:
        """Take over a daemon another process started (a prolog), so this one can command or stop it."""
        ...

    def set_default_active_thread_pct(self, index: int, pct: int) -> None:
        """SM share (1..100) of MPS servers spawned from now on: clients already running keep theirs."""
        ...

    def set_active_thread_pct(self, index: int, server_pid: int, pct: int) -> None:
        """SM share (1..100) of the clients MPS server ``server_pid`` creates from now on.

        ``server_pid`` is an ``nvidia-cuda-mps-server`` process, not a CUDA client; a client that is
        already running keeps the share its context was created with (nothing changes that).
        """
        ...

    def stop(self, index: int) -> None:
        """Quit the control daemon for GPU ``index``; idempotent."""
        ...
