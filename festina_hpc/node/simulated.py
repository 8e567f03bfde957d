"""Simulated GPUs and MPS that persist across processes: what the dev cluster's nodes run on.

Each Slurm hook is a new process, yet the prolog's energy snapshot and the
epilog's read must see one counter. ``PersistentSimulatedGpu`` keeps a
``SimulatedGpuBackend`` (wall-clock time) whose state is loaded from a JSON
file before, and saved after, every call, under its own ``flock``.
``PersistentSimulatedMps`` keeps its daemons in a file too; each "control
daemon" is a real placeholder process (``sleep``) so that a crash is
observable the way it is on a GPU node: the process is gone. Its PID and start
time (from /proc) are recorded so a reused PID is never mistaken for it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from festina_hpc.errors import GpuError
from festina_hpc.gpu.base import GpuInfo, Workload
from festina_hpc.gpu.mps import check_active_thread_pct, check_server_pid
from festina_hpc.gpu.simulated import SimulatedGpuBackend
from festina_hpc.profiles.store import ProfileStore

T = TypeVar("T")


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise GpuError(f"{path}: unreadable simulated state ({exc})") from None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class PersistentSimulatedGpu:
    """``GpuBackend`` over a state file; ``set_workloads`` tells it what the jobs run."""

    def __init__(self, path: Path, store: ProfileStore, gpu_type: str, count: int,
                 clock: Callable[[], float] = time.time):
        self._path = path
        self._lock = path.with_name(path.name + ".lock")
        self._backend = SimulatedGpuBackend(store, gpu_type, count, clock)
        self.spec = self._backend.spec

    def _do(self, call: Callable[[SimulatedGpuBackend], T], write: bool = True) -> T:
        with _locked(self._lock):
            saved = _read_json(self._path)
            if saved is not None:
                self._backend.restore_state(saved)
            result = call(self._backend)
            # Reads integrate the counter up to now, so they write too: the next process starts from here.
            if write:
                _write_json(self._path, self._backend.export_state())
            return result

    def set_workloads(self, index: int, workloads: Sequence[Workload]) -> None:
        self._do(lambda b: b.set_workloads(index, workloads))

    def workloads(self, index: int) -> tuple[Workload, ...]:
        return self._do(lambda b: b.workloads(index), write=False)

    def device_count(self) -> int:
        return self._backend.device_count()

    def info(self, index: int) -> GpuInfo:
        return self._backend.info(index)

    def power_w(self, index: int) -> float:
        return self._do(lambda b: b.power_w(index), write=False)

    def energy_j(self, index: int) -> float:
        return self._do(lambda b: b.energy_j(index))

    def memory_used_bytes(self, index: int) -> int:
        return self._do(lambda b: b.memory_used_bytes(index), write=False)

    def supported_clocks_mhz(self, index: int) -> Sequence[int]:
        return self._backend.supported_clocks_mhz(index)

    def current_clock_mhz(self, index: int) -> int:
        return self._do(lambda b: b.current_clock_mhz(index), write=False)

    def lock_clocks(self, index: int, clock_mhz: int) -> int | None:
        return self._do(lambda b: b.lock_clocks(index, clock_mhz))

    def reset_clocks(self, index: int) -> None:
        self._do(lambda b: b.reset_clocks(index))

    def power_limit_w(self, index: int) -> float:
        return self._do(lambda b: b.power_limit_w(index), write=False)

    def set_power_limit_w(self, index: int, power_w: float) -> None:
        self._do(lambda b: b.set_power_limit_w(index, power_w))

    def close(self) -> None:
        """Nothing to release."""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class PersistentSimulatedMps:
    """``MpsControl`` for simulated GPUs: daemons are placeholder processes recorded in a state file."""

    def __init__(self, path: Path, count: int):
        self._path = path
        self._lock = path.with_name(path.name + ".lock")
        self._count = count
        self._sleep = shutil.which("sleep", path="/usr/bin:/bin") or "/bin/sleep"

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self._count:
            raise GpuError(f"GPU {index}: no such GPU (this node has {self._count} simulated)")

    def _load(self) -> dict[str, Any]:
        data = _read_json(self._path)
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _alive(entry: dict[str, Any]) -> bool:
        return _start_time(int(entry["pid"])) == entry["start_time"]

    def daemon(self, index: int) -> dict[str, Any] | None:
        """What is recorded for GPU ``index`` (pid, directories, shares), None without a daemon."""
        self._check_index(index)
        entry = self._load().get(str(index))
        return dict(entry) if isinstance(entry, dict) else None

    def running(self, index: int, pipe_dir: Path) -> bool:
        self._check_index(index)
        entry = self._load().get(str(index))
        return entry is not None and entry["pipe_dir"] == str(pipe_dir) and self._alive(entry)

    def attach(self, index: int, pipe_dir: Path, log_dir: Path) -> None:
        self._check_index(index)

    def start(self, index: int, pipe_dir: Path, log_dir: Path) -> None:
        self._check_index(index)
        with _locked(self._lock):
            daemons = self._load()
            entry = daemons.get(str(index))
            if entry is not None and self._alive(entry):
                if entry["pipe_dir"] != str(pipe_dir):
                    raise GpuError(f"GPU {index}: start MPS: a daemon already runs with pipe dir {entry['pipe_dir']}")
                return
            for folder in (pipe_dir, log_dir):
                folder.mkdir(parents=True, exist_ok=True)
            # Its own session, stdio on /dev/null: it outlives the hook that starts it, as the real daemon does.
            proc = subprocess.Popen([self._sleep, "infinity"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            start_time = _start_time(proc.pid)
            daemons[str(index)] = {"pid": proc.pid, "start_time": start_time, "pipe_dir": str(pipe_dir),
                                   "log_dir": str(log_dir), "default_pct": 100, "server_pct": {}}
            _write_json(self._path, daemons)
            with (log_dir / "control.log").open("a") as log:
                log.write(f"{time.strftime('%FT%T')} simulated MPS control daemon started, pid {proc.pid}\n")

    def _update(self, index: int, operation: str, change: Callable[[dict[str, Any]], None]) -> None:
        self._check_index(index)
        with _locked(self._lock):
            daemons = self._load()
            entry = daemons.get(str(index))
            if entry is None or not self._alive(entry):
                raise GpuError(f"GPU {index}: {operation}: no MPS control daemon is running")
            change(entry)
            _write_json(self._path, daemons)

    def set_default_active_thread_pct(self, index: int, pct: int) -> None:
        check_active_thread_pct(index, pct)
        self._update(index, "set default active thread percentage", lambda e: e.update(default_pct=pct))

    def set_active_thread_pct(self, index: int, server_pid: int, pct: int) -> None:
        check_server_pid(index, server_pid)
        check_active_thread_pct(index, pct)
        self._update(index, "set active thread percentage",
                     lambda e: e["server_pct"].update({str(server_pid): pct}))

    def stop(self, index: int) -> None:
        self._check_index(index)
        with _locked(self._lock):
            daemons = self._load()
            entry = daemons.pop(str(index), None)
            if entry is not None and self._alive(entry):
                try:
                    os.kill(int(entry["pid"]), signal.SIGTERM)
                except ProcessLookupError:
                    pass
            _write_json(self._path, daemons)
