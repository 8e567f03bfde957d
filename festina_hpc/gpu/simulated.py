"""The simulated backend: GPUs whose power, energy counter and memory follow the profiles.

A ``SimulatedGpuBackend`` stands in for NVML wherever there is no GPU (tests,
laptops, the simulator, ``festina profiles measure --backend simulated``). It
is told what each GPU runs (``set_workloads``) and answers from the profile
tables; time comes from an injected clock (``time.monotonic``, or a
``ManualClock`` that moves only when told to, for instant and exact runs).
Power model, per GPU, at the GPU's locked SM clock::

    power_w = min(power_limit_w, idle_w + sum over workloads of (profile power_w - idle_w))

that is, each co-resident instance adds the dynamic power it draws alone at
its SM share; no workload draws ``idle_w``. Where the power limit binds, steps
stretch so that each keeps its profile energy (as the firmware's power capping
does by lowering clocks). The energy counter integrates this power,
piecewise constant, over the injected clock: every change of workloads, clock
or power limit first integrates up to now. Memory used is the weights share
plus KV cache of every workload; a set of workloads that does not fit is
refused like an out-of-memory on a real GPU.

Lookups clamp to the table edges: a device must answer for whatever runs on
it (a batch or context beyond the tabulated grid), as a real GPU would, rather
than fail the simulation; answers at the edge are then approximate.

``SimulatedMps`` is the matching fake of MPS control: it records, per GPU,
whether a daemon runs, its directories and the SM shares it was given.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from festina_hpc.errors import GpuError
from festina_hpc.gpu.base import GpuInfo, Workload
from festina_hpc.gpu.mps import check_active_thread_pct, check_server_pid
from festina_hpc.gpu.nvml import nearest_clock_mhz
from festina_hpc.profiles.store import Prediction, ProfileStore
from festina_hpc.profiles.table import PHASES


class ManualClock:
    """A clock that moves only when told to: drives simulated GPUs without waiting."""

    def __init__(self, start_s: float = 0.0):
        self._now_s = start_s

    def now(self) -> float:
        return self._now_s

    def __call__(self) -> float:
        return self._now_s

    def advance(self, duration_s: float) -> None:
        if not math.isfinite(duration_s) or duration_s < 0:
            raise ValueError(f"duration_s = {duration_s!r} must be a non-negative number")
        self._now_s += duration_s


@dataclass(frozen=True)
class _GpuState:
    clock_mhz: int
    power_limit_w: float
    workloads: tuple[Workload, ...] = ()
    energy_j: float = 0.0
    integrated_to_s: float = 0.0  # time up to which energy_j is integrated


class SimulatedGpuBackend:
    """``count`` GPUs of profile type ``gpu_type``; ``clock`` gives the time in seconds."""

    def __init__(self, store: ProfileStore, gpu_type: str, count: int, clock: Callable[[], float]):
        if count < 1:
            raise GpuError(f"simulated GPUs: count = {count} must be at least 1")
        self._store = store
        self.spec = store.gpu(gpu_type)
        self._clock = clock
        start_s = clock()
        self._gpus = [_GpuState(clock_mhz=self.spec.max_clock_mhz, power_limit_w=self.spec.tdp_w,
                                integrated_to_s=start_s) for _ in range(count)]

    # -- state -------------------------------------------------------------------------------

    def _state(self, index: int) -> _GpuState:
        if not 0 <= index < len(self._gpus):
            raise GpuError(f"GPU {index}: no such GPU (this node has {len(self._gpus)} simulated)")
        return self._gpus[index]

    def _integrated(self, index: int) -> _GpuState:
        """The GPU's state with its energy counter brought up to now (stored)."""
        state = self._state(index)
        now_s = self._clock()
        elapsed_s = max(0.0, now_s - state.integrated_to_s)
        if elapsed_s > 0.0:
            energy_j = state.energy_j + self._power(state)[0] * elapsed_s
            state = replace(state, energy_j=energy_j, integrated_to_s=now_s)
            self._gpus[index] = state
        return state

    def _predict(self, workload: Workload, clock_mhz: int) -> Prediction:
        return self._store.predict(self.spec.name, workload.model, workload.phase, workload.batch,
                                   workload.context_tokens, workload.sm_pct, clock_mhz, clamp=True)

    def _power(self, state: _GpuState) -> tuple[float, float]:
        """(board power, uncapped board power) of a GPU in ``state``."""
        idle_w = self.spec.idle_w
        uncapped_w = idle_w + sum(max(0.0, self._predict(w, state.clock_mhz).power_w - idle_w)
                                  for w in state.workloads)
        return min(uncapped_w, state.power_limit_w), uncapped_w

    # -- what the GPU runs -------------------------------------------------------------------

    def set_workloads(self, index: int, workloads: Sequence[Workload]) -> None:
        """Replace what GPU ``index`` runs; ``[]`` makes it idle."""
        new = tuple(workloads)
        for w in new:
            if w.phase not in PHASES:
                raise GpuError(f"GPU {index}: workload {w.model}: phase = {w.phase!r} is not one of "
                               f"{', '.join(PHASES)}")
            if w.batch < 1 or w.context_tokens < 1 or not 0 < w.sm_pct <= 100:
                raise GpuError(f"GPU {index}: workload {w.model}: batch = {w.batch}, context_tokens = "
                               f"{w.context_tokens}, sm_pct = {w.sm_pct:g} must be positive (sm_pct at most 100)")
            # Fails now, with the profile's own message, for a model without a table on this GPU type.
            self._predict(w, self.spec.max_clock_mhz)
        need_bytes = self._memory_bytes(new)
        if need_bytes > self.spec.memory_bytes:
            raise GpuError(f"GPU {index}: out of memory: workloads need {need_bytes / 2**30:.1f} GiB, "
                           f"the GPU has {self.spec.memory_gib:g} GiB")
        state = self._integrated(index)
        self._gpus[index] = replace(state, workloads=new)

    def workloads(self, index: int) -> tuple[Workload, ...]:
        return self._state(index).workloads

    def step_latency_s(self, index: int, workload: Workload) -> float:
        """Time of one step of ``workload`` at GPU ``index``'s clock, stretched if the power limit binds."""
        state = self._state(index)
        latency_s = self._predict(workload, state.clock_mhz).latency_s
        power_w, uncapped_w = self._power(state)
        return latency_s * uncapped_w / power_w

    def _memory_bytes(self, workloads: Sequence[Workload]) -> int:
        total = 0.0
        for w in workloads:
            model = self._store.model(w.model)
            tp = model.tp_on(self.spec.name)
            total += model.weights_bytes / tp + w.batch * w.context_tokens * model.kv_bytes_per_token / tp
        return int(total)

    # -- GpuBackend --------------------------------------------------------------------------

    def device_count(self) -> int:
        return len(self._gpus)

    def info(self, index: int) -> GpuInfo:
        self._state(index)
        # The driver's product name (an alias such as "NVIDIA H100 80GB HBM3") so that callers resolve a
        # simulated GPU to its spec exactly as they resolve a real one.
        driver_names = [a for a in self.spec.aliases if a.startswith("NVIDIA ")]
        name = driver_names[0] if driver_names else self.spec.name
        gpu_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"festina-simulated/{self.spec.name}/{index}")
        return GpuInfo(index=index, name=name, uuid=f"GPU-{gpu_uuid}", memory_total_bytes=self.spec.memory_bytes,
                       tdp_w=self.spec.tdp_w)

    def power_w(self, index: int) -> float:
        return self._power(self._state(index))[0]

    def energy_j(self, index: int) -> float:
        return self._integrated(index).energy_j

    def memory_used_bytes(self, index: int) -> int:
        return self._memory_bytes(self._state(index).workloads)

    def supported_clocks_mhz(self, index: int) -> Sequence[int]:
        self._state(index)
        return self.spec.supported_clocks_mhz

    def current_clock_mhz(self, index: int) -> int:
        return self._state(index).clock_mhz

    def lock_clocks(self, index: int, clock_mhz: int) -> int | None:
        if clock_mhz <= 0:
            raise GpuError(f"GPU {index}: lock clocks: clock_mhz = {clock_mhz} must be positive")
        applied_mhz = nearest_clock_mhz(self.spec.supported_clocks_mhz, clock_mhz)
        state = self._integrated(index)
        self._gpus[index] = replace(state, clock_mhz=applied_mhz)
        return applied_mhz

    def reset_clocks(self, index: int) -> None:
        state = self._integrated(index)
        self._gpus[index] = replace(state, clock_mhz=self.spec.max_clock_mhz)

    def power_limit_w(self, index: int) -> float:
        return self._state(index).power_limit_w

    def set_power_limit_w(self, index: int, power_w: float) -> None:
        if not math.isfinite(power_w) or not 0 < power_w <= self.spec.tdp_w:
            raise GpuError(f"GPU {index}: set power limit: power_w = {power_w!r} must be in "
                           f"(0, {self.spec.tdp_w:g}] W")
        state = self._integrated(index)
        self._gpus[index] = replace(state, power_limit_w=float(power_w))

    def close(self) -> None:
        """Nothing to release; here so that every backend can be closed alike."""

    # -- persistence (a node's hooks are separate processes that must see one counter) ------------

    def export_state(self) -> list[dict[str, Any]]:
        """Every GPU's clock, power limit, workloads and energy counter, integrated up to now, as plain data."""
        for index in range(len(self._gpus)):
            self._integrated(index)
        return [{"clock_mhz": g.clock_mhz, "power_limit_w": g.power_limit_w, "energy_j": g.energy_j,
                 "integrated_to_s": g.integrated_to_s,
                 "workloads": [dataclasses.asdict(w) for w in g.workloads]} for g in self._gpus]

    def restore_state(self, data: Sequence[Mapping[str, Any]]) -> None:
        """Take over what ``export_state`` wrote (another process's view of the same GPUs)."""
        if len(data) != len(self._gpus):
            raise GpuError(f"simulated GPUs: saved state holds {len(data)} GPUs, this backend {len(self._gpus)}")
        gpus = []
        for item in data:
            try:
                workloads = tuple(Workload(**w) for w in item["workloads"])
                gpus.append(_GpuState(clock_mhz=int(item["clock_mhz"]),
                                      power_limit_w=float(item["power_limit_w"]),
                                      workloads=workloads, energy_j=float(item["energy_j"]),
                                      integrated_to_s=float(item["integrated_to_s"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise GpuError(f"simulated GPUs: unreadable saved state ({exc})") from None
        self._gpus = gpus


@dataclass(frozen=True)
class MpsDaemonState:
    """What a simulated MPS control daemon was told."""

    pipe_dir: Path
    log_dir: Path
    default_pct: int = 100
    server_pct: Mapping[int, int] = field(default_factory=dict)  # MPS server PID -> active-thread percentage


class SimulatedMps:
    """``MpsControl`` for ``count`` simulated GPUs; ``daemon(index)`` shows what was set."""

    def __init__(self, count: int):
        self._count = count
        self._daemons: dict[int, MpsDaemonState] = {}

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self._count:
            raise GpuError(f"GPU {index}: no such GPU (this node has {self._count} simulated)")

    def _running(self, index: int, operation: str) -> MpsDaemonState:
        self._check_index(index)
        if index not in self._daemons:
            raise GpuError(f"GPU {index}: {operation}: no MPS control daemon is running")
        return self._daemons[index]

    def daemon(self, index: int) -> MpsDaemonState | None:
        self._check_index(index)
        return self._daemons.get(index)

    def start(self, index: int, pipe_dir: Path, log_dir: Path) -> None:
        self._check_index(index)
        running = self._daemons.get(index)
        if running is None:
            self._daemons[index] = MpsDaemonState(pipe_dir=pipe_dir, log_dir=log_dir)
        elif (running.pipe_dir, running.log_dir) != (pipe_dir, log_dir):
            raise GpuError(f"GPU {index}: start MPS: a daemon already runs with pipe dir {running.pipe_dir}")

    def set_default_active_thread_pct(self, index: int, pct: int) -> None:
        check_active_thread_pct(index, pct)
        state = self._running(index, "set default active thread percentage")
        self._daemons[index] = replace(state, default_pct=pct)

    def set_active_thread_pct(self, index: int, server_pid: int, pct: int) -> None:
        check_server_pid(index, server_pid)
        check_active_thread_pct(index, pct)
        state = self._running(index, "set active thread percentage")
        self._daemons[index] = replace(state, server_pct={**state.server_pct, server_pid: pct})

    def running(self, index: int, pipe_dir: Path) -> bool:
        self._check_index(index)
        daemon = self._daemons.get(index)
        return daemon is not None and daemon.pipe_dir == pipe_dir

    def attach(self, index: int, pipe_dir: Path, log_dir: Path) -> None:
        self.start(index, pipe_dir, log_dir)

    def stop(self, index: int) -> None:
        self._check_index(index)
        self._daemons.pop(index, None)
