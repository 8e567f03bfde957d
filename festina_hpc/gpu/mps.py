"""NVIDIA MPS control for real GPUs: one ``nvidia-cuda-mps-control`` daemon per GPU.

``NvidiaMps`` starts the control daemon of a GPU with its own pipe and log
directories (``CUDA_MPS_PIPE_DIRECTORY``, ``CUDA_MPS_LOG_DIRECTORY``,
``CUDA_VISIBLE_DEVICES``), and sends it commands on stdin through the same
executable, which finds the daemon by the pipe directory. Commands are argv
lists, never shell strings, and run with a timeout. The executable path and
the function that runs it are injected, so tests check argv, environment and
stdin with a fake runner. The input checks are shared with ``SimulatedMps``.

What a share reaches: an MPS client's active-thread percentage is fixed when
its CUDA context is created, and no command changes it for a running client.
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` in the client's environment (festina's
task prolog sets it per job) can only lower the limit the daemon gives. The
daemon's two commands set that limit for later starts:
``set_default_active_thread_percentage`` for MPS servers spawned from then on
(a GPU's default, before its jobs start), ``set_active_thread_percentage``
for the clients one MPS server (an ``nvidia-cuda-mps-server`` PID from
``get_server_list``, not a CUDA client's) creates from then on. One MPS server
serves every client of a user on the GPU, so the latter cannot single out
one instance either: festina changes an instance's share by starting a new
instance at it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from festina_hpc.errors import GpuError

MPS_CONTROL = "nvidia-cuda-mps-control"
# What the control client prints (status 1) when no daemon listens on its pipe directory.
NO_DAEMON_MARKER = "Cannot find MPS control daemon process"


def check_active_thread_pct(index: int, pct: int) -> None:
    """An MPS active-thread percentage is an integer from 1 to 100."""
    if isinstance(pct, bool) or not isinstance(pct, int) or not 1 <= pct <= 100:
        raise GpuError(f"GPU {index}: MPS active thread percentage = {pct!r} must be an integer from 1 to 100")


def check_server_pid(index: int, server_pid: int) -> None:
    if isinstance(server_pid, bool) or not isinstance(server_pid, int) or server_pid <= 0:
        raise GpuError(f"GPU {index}: MPS server pid = {server_pid!r} must be a positive integer")


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], stdin: str, timeout_s: float) -> RunResult:
        """Run ``argv`` to completion with ``env`` and ``stdin``; raise ``GpuError`` if it cannot run."""
        ...


def run_command(argv: Sequence[str], *, env: Mapping[str, str], stdin: str, timeout_s: float) -> RunResult:
    """The real ``CommandRunner``: ``subprocess.run`` without a shell."""
    try:
        done = subprocess.run(list(argv), input=stdin, env=dict(env), capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise GpuError(f"{argv[0]} did not finish within {timeout_s:g} s") from None
    except OSError as exc:
        raise GpuError(f"cannot run {argv[0]}: {exc.strerror}") from None
    return RunResult(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class _Daemon:
    pipe_dir: Path
    log_dir: Path


class NvidiaMps:
    """``MpsControl`` through ``nvidia-cuda-mps-control``; remembers the daemons this process started."""

    def __init__(self, executable: str = MPS_CONTROL, run: CommandRunner = run_command, timeout_s: float = 10.0,
                 base_env: Mapping[str, str] | None = None):
        """``base_env`` is the environment the daemon inherits (default: this process's, read now)."""
        self._executable = executable
        self._run = run
        self._timeout_s = timeout_s
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._daemons: dict[int, _Daemon] = {}

    def _env(self, index: int, daemon: _Daemon) -> dict[str, str]:
        # PCI bus order makes CUDA's device index the NVML index that callers address GPUs by.
        return {**self._base_env, "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipe_dir),
                "CUDA_MPS_LOG_DIRECTORY": str(daemon.log_dir), "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                "CUDA_VISIBLE_DEVICES": str(index)}

    def _invoke(self, index: int, daemon: _Daemon, operation: str, args: Sequence[str], stdin: str) -> str:
        try:
            result = self._run([self._executable, *args], env=self._env(index, daemon), stdin=stdin,
                               timeout_s=self._timeout_s)
        except GpuError as exc:
            raise GpuError(f"GPU {index}: {operation}: {exc}") from None
        if result.returncode != 0:
            output = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[0]
            raise GpuError(f"GPU {index}: {operation}: {self._executable} exited with status "
                           f"{result.returncode}: {output}")
        return result.stdout

    def _running(self, index: int, operation: str) -> _Daemon:
        if index not in self._daemons:
            raise GpuError(f"GPU {index}: {operation}: no MPS control daemon was started for this GPU")
        return self._daemons[index]

    def start(self, index: int, pipe_dir: Path, log_dir: Path) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise GpuError(f"GPU index = {index!r} must be a non-negative integer")
        daemon = _Daemon(Path(pipe_dir), Path(log_dir))
        running = self._daemons.get(index)
        if running == daemon:
            return
        if running is not None:
            raise GpuError(f"GPU {index}: start MPS: a daemon already runs with pipe dir {running.pipe_dir}")
        for folder in (daemon.pipe_dir, daemon.log_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise GpuError(f"GPU {index}: start MPS: cannot create {folder}: {exc.strerror}") from None
        self._invoke(index, daemon, "start MPS", ["-d"], stdin="")
        self._daemons[index] = daemon

    def running(self, index: int, pipe_dir: Path) -> bool:
        """Asks the daemon on ``pipe_dir`` for its server list: it answers unless it is gone."""
        daemon = _Daemon(Path(pipe_dir), Path(pipe_dir))
        try:
            result = self._run([self._executable], env=self._env(index, daemon), stdin="get_server_list\n",
                               timeout_s=self._timeout_s)
        except GpuError:
            return False
        return result.returncode == 0 and NO_DAEMON_MARKER not in result.stdout + result.stderr

    def attach(self, index: int, pipe_dir: Path, log_dir: Path) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise GpuError(f"GPU index = {index!r} must be a non-negative integer")
        self._daemons[index] = _Daemon(Path(pipe_dir), Path(log_dir))

    def set_default_active_thread_pct(self, index: int, pct: int) -> None:
        """The share of MPS servers spawned from now on, so of clients started later; running ones keep theirs."""
        check_active_thread_pct(index, pct)
        operation = "set default active thread percentage"
        daemon = self._running(index, operation)
        self._invoke(index, daemon, operation, [], stdin=f"set_default_active_thread_percentage {pct}\n")

    def server_pids(self, index: int) -> tuple[int, ...]:
        """The PIDs of the MPS servers (``nvidia-cuda-mps-server``) GPU ``index``'s daemon runs now."""
        operation = "list MPS servers"
        daemon = self._running(index, operation)
        return tuple(int(word) for word in self._invoke(index, daemon, operation, [], stdin="get_server_list\n").split()
                     if word.isdigit())

    def set_active_thread_pct(self, index: int, server_pid: int, pct: int) -> None:
        """Share of the clients MPS server ``server_pid`` creates from now on; running ones keep theirs.

        A PID that is not one of the daemon's servers (a CUDA client's, such as a model server's) is
        refused before anything is set: nothing changes a running client's share.
        """
        check_server_pid(index, server_pid)
        check_active_thread_pct(index, pct)
        operation = f"set active thread percentage of server {server_pid}"
        daemon = self._running(index, operation)
        servers = self.server_pids(index)
        if server_pid not in servers:
            raise GpuError(f"GPU {index}: {operation}: pid {server_pid} is not an MPS server of this GPU (servers: "
                           f"{', '.join(map(str, servers)) or 'none'}); a client's share is fixed when it starts")
        self._invoke(index, daemon, operation, [], stdin=f"set_active_thread_percentage {server_pid} {pct}\n")

    def stop(self, index: int) -> None:
        daemon = self._daemons.get(index)
        if daemon is None:
            return
        try:
            self._invoke(index, daemon, "stop MPS", [], stdin="quit\n")
        except GpuError as exc:
            # A daemon that already died is stopped: stop stays idempotent, and a restart can follow.
            if NO_DAEMON_MARKER not in str(exc):
                raise
        del self._daemons[index]
