"""The offline profiler behind ``festina profiles measure``: a profile table measured on a site's own GPU.

For every grid point (phase, batch, context, SM share, SM clock) the profiler
locks the clock, lets a ``StepRunner`` prepare the workload (not measured),
then reads the time and the GPU's energy counter, runs the workload for a
number of steps, and reads both again: ``latency_s = elapsed / steps`` and
``power_w = energy delta / elapsed``. Clocks are reset afterwards, always.
The result is a ``ProfileTable`` in the shipped format, with notes saying how
it was measured.

Two runners exist. ``SimulatedStepRunner`` drives a ``SimulatedGpuBackend``
on a ``ManualClock``: it advances virtual time by the profile latency, so
measuring is instant and reproduces the source table (a check of the whole
measuring path). ``TorchStepRunner`` runs a model-shaped torch micro-workload
on a real GPU in a child process (``torch_worker``), one per SM share, each an
MPS client with its active-thread percentage where the share is below 100%.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from festina_hpc.errors import GpuError, GpuNotSupportedError, GpuPermissionError, ProfileError
from festina_hpc.gpu.base import GpuBackend, MpsControl, Workload
from festina_hpc.gpu.nvml import nearest_clock_mhz
from festina_hpc.gpu.simulated import ManualClock, SimulatedGpuBackend
from festina_hpc.profiles.specs import GpuSpec, ModelSpec
from festina_hpc.profiles.table import PHASES, ProfileTable
from festina_hpc.profiles.torch_worker import ModelShape


class StepRunner(Protocol):
    def prepare(self, phase: str, batch: int, context_tokens: int, sm_pct: float) -> None:
        """Set up (allocate, warm up) one grid point's workload; not measured."""
        ...

    def run(self) -> int:
        """Run the prepared workload on the GPU; the number of steps run (at least 1)."""
        ...


@dataclass(frozen=True)
class MeasuredPoint:
    phase: str
    batch: int
    context_tokens: int
    sm_pct: float
    clock_mhz: int
    steps: int  # steps run between the two readings
    elapsed_s: float  # time between the two readings
    energy_j: float  # energy counter delta between the two readings
    latency_s: float  # elapsed_s / steps
    power_w: float  # energy_j / elapsed_s


@dataclass(frozen=True)
class Measurement:
    table: ProfileTable
    points: tuple[MeasuredPoint, ...]
    measured_s: float  # time spent inside the measured runs, on the measuring clock


def _axis(name: str, values: Sequence[float]) -> list[float]:
    axis = sorted(set(values))
    for v in axis:
        if not np.isfinite(v) or v <= 0:
            raise ProfileError(f"measure: {name} value {v!r} must be a positive number")
    return axis


def measure_point(backend: GpuBackend, gpu_index: int, runner: StepRunner, clock: Callable[[], float],
                  phase: str, batch: int, context_tokens: int, sm_pct: float, clock_mhz: int) -> MeasuredPoint:
    """Measure one grid point at the clock already locked."""
    runner.prepare(phase, batch, context_tokens, sm_pct)
    start_s = clock()
    start_j = backend.energy_j(gpu_index)
    steps = runner.run()
    end_j = backend.energy_j(gpu_index)
    elapsed_s = clock() - start_s
    where = f"GPU {gpu_index}: {phase} batch={batch} context={context_tokens} sm_pct={sm_pct:g} clock={clock_mhz}"
    if steps < 1 or elapsed_s <= 0:
        raise GpuError(f"{where}: the run took {elapsed_s:g} s for {steps} steps; nothing to measure")
    energy_j = end_j - start_j
    if energy_j <= 0:
        raise GpuError(f"{where}: the energy counter did not advance in {elapsed_s:g} s; run longer")
    return MeasuredPoint(phase=phase, batch=batch, context_tokens=context_tokens, sm_pct=sm_pct,
                         clock_mhz=clock_mhz, steps=steps, elapsed_s=elapsed_s, energy_j=energy_j,
                         latency_s=elapsed_s / steps, power_w=energy_j / elapsed_s)


def measure_table(backend: GpuBackend, gpu_index: int, gpu_spec: GpuSpec, model_spec: ModelSpec, tp: int,
                  batches: Sequence[int], contexts: Sequence[int], sm_pcts: Sequence[float],
                  clocks_mhz: Sequence[int], run_step: StepRunner, clock: Callable[[], float],
                  notes: Sequence[str] = ()) -> Measurement:
    """Measure the full grid on GPU ``gpu_index``; requested clocks snap to the GPU's supported clocks.

    Raises ``GpuPermissionError`` (and measures nothing) where the clocks
    cannot be locked: a table whose clock axis was not really applied would
    mislead every decision taken from it.
    """
    batch_axis = [int(b) for b in _axis("batches", batches)]
    context_axis = [int(c) for c in _axis("contexts", contexts)]
    sm_axis = _axis("sm_pcts", sm_pcts)
    if sm_axis[-1] > 100:
        raise ProfileError(f"measure: sm_pcts value {sm_axis[-1]:g} must be at most 100")
    supported = backend.supported_clocks_mhz(gpu_index)
    clock_axis = [int(c) for c in _axis("clocks_mhz", [nearest_clock_mhz(supported, c) for c in clocks_mhz])]
    shape = (len(PHASES), len(batch_axis), len(context_axis), len(sm_axis), len(clock_axis))
    latency_s = np.zeros(shape)
    power_w = np.zeros(shape)
    points: list[MeasuredPoint] = []
    try:
        for k in reversed(range(len(clock_axis))):
            clock_mhz = clock_axis[k]
            applied_mhz = backend.lock_clocks(gpu_index, clock_mhz)
            if applied_mhz is None:
                raise GpuPermissionError(f"GPU {gpu_index}: cannot lock the SM clock at {clock_mhz} MHz (no "
                                         f"permission); measuring a profile over clocks needs root")
            if applied_mhz != clock_mhz:
                raise GpuError(f"GPU {gpu_index}: asked to lock the SM clock at {clock_mhz} MHz, "
                               f"the GPU applied {applied_mhz} MHz")
            # SM share outermost within a clock: a real runner changes process when the share changes.
            for s, sm_pct in enumerate(sm_axis):
                for p, phase in enumerate(PHASES):
                    for i, batch in enumerate(batch_axis):
                        for j, context in enumerate(context_axis):
                            point = measure_point(backend, gpu_index, run_step, clock, phase, batch, context,
                                                  sm_pct, clock_mhz)
                            latency_s[p, i, j, s, k] = point.latency_s
                            power_w[p, i, j, s, k] = point.power_w
                            points.append(point)
    finally:
        backend.reset_clocks(gpu_index)
    table_notes = [
        f"measured with festina profiles measure on GPU {gpu_index}: {backend.info(gpu_index).name}",
        "latency_s = elapsed / steps and power_w = energy counter delta / elapsed, per grid point",
        *notes,
    ]
    table = ProfileTable(gpu_spec.name, model_spec.name, tp,
                         [batch_axis, context_axis, sm_axis, clock_axis], latency_s, power_w, table_notes)
    return Measurement(table=table, points=tuple(points), measured_s=sum(pt.elapsed_s for pt in points))


class SimulatedStepRunner:
    """Runs a workload on a simulated GPU by advancing the manual clock by its profile latency."""

    def __init__(self, backend: SimulatedGpuBackend, gpu_index: int, model: str, clock: ManualClock,
                 steps: int = 1):
        self._backend = backend
        self._index = gpu_index
        self._model = model
        self._clock = clock
        self._steps = steps
        self._workload: Workload | None = None

    def prepare(self, phase: str, batch: int, context_tokens: int, sm_pct: float) -> None:
        self._workload = Workload(self._model, phase, batch, context_tokens, sm_pct)
        self._backend.set_workloads(self._index, [self._workload])

    def run(self) -> int:
        if self._workload is None:
            raise GpuError(f"GPU {self._index}: run before prepare")
        self._clock.advance(self._backend.step_latency_s(self._index, self._workload) * self._steps)
        # Going idle integrates the workload's energy up to now; the next reading sees all of it.
        self._backend.set_workloads(self._index, [])
        return self._steps


def worker_argv() -> list[str]:
    """How ``TorchStepRunner`` starts a worker: this Python, the ``torch_worker`` module."""
    return [sys.executable, "-m", "festina_hpc.profiles.torch_worker"]


class TorchStepRunner:
    """Runs the torch micro-workload on a real GPU in a worker process, one per SM share.

    Without ``mps_env`` the worker sees only the GPU ``gpu_uuid`` and only an
    SM share of 100 can be measured. With ``mps_env`` (the pipe and log
    directories of an MPS daemon already running for that GPU) each worker is
    an MPS client with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` set to its share.
    """

    def __init__(self, model: ModelSpec, tp: int, gpu_uuid: str, mps_env: Mapping[str, str] | None = None,
                 base_env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None,
                 min_duration_s: float = 0.5, reply_timeout_s: float = 600.0):
        """``base_env`` defaults to this process's environment, read now."""
        self._shape = ModelShape(params_b=model.params_b, layers=model.layers, hidden=model.hidden,
                                 heads=model.heads, kv_heads=model.kv_heads, head_dim=model.head_dim, tp=tp)
        self._gpu_uuid = gpu_uuid
        self._mps_env = None if mps_env is None else dict(mps_env)
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._argv = list(worker_argv() if argv is None else argv)
        self._min_duration_s = min_duration_s
        self._reply_timeout_s = reply_timeout_s
        self._worker: subprocess.Popen[str] | None = None
        self._worker_stderr: IO[bytes] | None = None
        self._worker_sm_pct: float | None = None

    def _worker_env(self, sm_pct: float) -> dict[str, str]:
        env = dict(self._base_env)
        if self._mps_env is None:
            if sm_pct != 100:
                raise GpuNotSupportedError(f"GPU {self._gpu_uuid}: an SM share of {sm_pct:g}% needs an MPS daemon "
                                           f"for the GPU; without one only 100% can be measured")
            env["CUDA_VISIBLE_DEVICES"] = self._gpu_uuid
            return env
        if sm_pct != int(sm_pct):
            raise GpuError(f"GPU {self._gpu_uuid}: MPS active thread percentage {sm_pct:g} must be a whole number")
        # An MPS client sees the GPUs of its MPS server (here only this one), so it must not pick its own.
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env.update(self._mps_env)
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(int(sm_pct))
        return env

    def _start_worker(self, sm_pct: float) -> None:
        env = self._worker_env(sm_pct)
        self._worker_stderr = tempfile.TemporaryFile()
        try:
            self._worker = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=self._worker_stderr, env=env, text=True)
        except OSError as exc:
            raise GpuError(f"cannot start the torch worker {self._argv[0]}: {exc.strerror}") from None
        self._worker_sm_pct = sm_pct
        self._reply("start")

    def _reply(self, operation: str) -> dict[str, Any]:
        worker = self._worker
        assert worker is not None and worker.stdout is not None
        ready, _, _ = select.select([worker.stdout], [], [], self._reply_timeout_s)
        line = worker.stdout.readline() if ready else ""
        if not line:
            if not ready:
                self.close()
                raise GpuError(f"torch worker: no answer to {operation} within {self._reply_timeout_s:g} s")
            worker.wait(timeout=10)
            raise GpuError(f"torch worker: exited with status {worker.returncode} during {operation}: "
                           f"{self._stderr_tail()}")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise GpuError(f"torch worker: unreadable answer to {operation}: {line.strip()[:200]!r}") from None
        if not reply.get("ok"):
            raise GpuError(f"torch worker: {operation} failed: {reply.get('error', 'no detail')}")
        return dict(reply)

    def _stderr_tail(self) -> str:
        if self._worker_stderr is None:
            return "no output"
        self._worker_stderr.seek(0)
        lines = self._worker_stderr.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def _request(self, operation: str, **fields: Any) -> dict[str, Any]:
        worker = self._worker
        assert worker is not None and worker.stdin is not None
        try:
            worker.stdin.write(json.dumps(fields) + "\n")
            worker.stdin.flush()
        except BrokenPipeError:
            worker.wait(timeout=10)
            raise GpuError(f"torch worker: exited with status {worker.returncode} before {operation}: "
                           f"{self._stderr_tail()}") from None
        return self._reply(operation)

    def prepare(self, phase: str, batch: int, context_tokens: int, sm_pct: float) -> None:
        if self._worker is None or self._worker_sm_pct != sm_pct:
            self.close()
            self._start_worker(sm_pct)
        self._request(f"prepare {phase} batch={batch} context={context_tokens}", op="prepare", phase=phase,
                      batch=batch, context_tokens=context_tokens, shape=asdict(self._shape))

    def run(self) -> int:
        if self._worker is None:
            raise GpuError("torch worker: run before prepare")
        return int(self._request("run", op="run", min_duration_s=self._min_duration_s)["steps"])

    def close(self) -> None:
        """Stop the worker (closing its stdin ends it); idempotent."""
        worker, self._worker, self._worker_sm_pct = self._worker, None, None
        if worker is not None:
            if worker.stdin is not None:
                worker.stdin.close()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()
        if self._worker_stderr is not None:
            self._worker_stderr.close()
            self._worker_stderr = None


@contextmanager
def step_runner(backend: GpuBackend, gpu_index: int, model: ModelSpec, tp: int, sm_pcts: Sequence[float],
                manual_clock: ManualClock, mps: MpsControl,
                work_dir: Path) -> Iterator[tuple[StepRunner, Callable[[], float]]]:
    """The runner and measuring clock for ``backend``, with an MPS daemon while real shares below 100% run.

    A simulated GPU runs on ``manual_clock`` (virtual time); a real GPU runs
    the torch worker on wall time, under an MPS daemon started in ``work_dir``
    for GPU ``gpu_index`` and stopped afterwards when a share is below 100%.
    """
    if isinstance(backend, SimulatedGpuBackend):
        yield SimulatedStepRunner(backend, gpu_index, model.name, manual_clock), manual_clock.now
        return
    gpu_uuid = backend.info(gpu_index).uuid
    mps_env: dict[str, str] | None = None
    if min(sm_pcts) < 100:
        pipe_dir, log_dir = work_dir / "mps-pipe", work_dir / "mps-log"
        mps.start(gpu_index, pipe_dir, log_dir)
        mps_env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(log_dir)}
    runner = TorchStepRunner(model, tp, gpu_uuid, mps_env)
    try:
        yield runner, time.perf_counter
    finally:
        runner.close()
        if mps_env is not None:
            mps.stop(gpu_index)
