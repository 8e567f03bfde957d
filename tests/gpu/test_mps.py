from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from festina_hpc.errors import GpuError
from festina_hpc.gpu.mps import NvidiaMps, RunResult, run_command
from festina_hpc.gpu.simulated import SimulatedMps


@dataclass
class FakeRunner:
    """Records each command; answers with ``answers[stdin]`` where given, else ``result``."""

    result: RunResult = field(default_factory=lambda: RunResult(0, "", ""))
    calls: list[tuple[list[str], dict[str, str], str, float]] = field(default_factory=list)
    answers: dict[str, RunResult] = field(default_factory=dict)

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], stdin: str, timeout_s: float) -> RunResult:
        self.calls.append((list(argv), dict(env), stdin, timeout_s))
        return self.answers.get(stdin, self.result)


def make_mps(runner: FakeRunner) -> NvidiaMps:
    return NvidiaMps(executable="/usr/bin/nvidia-cuda-mps-control", run=runner, timeout_s=5.0,
                     base_env={"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})


def test_start_runs_the_daemon_with_its_own_directories_and_gpu(tmp_path: Path) -> None:
    runner = FakeRunner()
    mps = make_mps(runner)
    mps.start(2, tmp_path / "pipe", tmp_path / "log")
    argv, env, stdin, timeout_s = runner.calls[0]
    assert argv == ["/usr/bin/nvidia-cuda-mps-control", "-d"]
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "pipe")
    assert env["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "log")
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["PATH"] == "/usr/bin"
    assert stdin == "" and timeout_s == 5.0
    assert (tmp_path / "pipe").is_dir() and (tmp_path / "log").is_dir()
    mps.start(2, tmp_path / "pipe", tmp_path / "log")
    assert len(runner.calls) == 1  # idempotent


def test_commands_go_on_stdin_to_the_gpus_daemon(tmp_path: Path) -> None:
    # 4242 is an MPS server (nvidia-cuda-mps-server): the share is for the clients it starts later.
    runner = FakeRunner(answers={"get_server_list\n": RunResult(0, "4242\n4343\n", "")})
    mps = make_mps(runner)
    mps.start(1, tmp_path / "pipe", tmp_path / "log")
    mps.set_default_active_thread_pct(1, 40)
    mps.set_active_thread_pct(1, 4242, 60)
    mps.stop(1)
    mps.stop(1)
    commands = [(argv, stdin, env["CUDA_MPS_PIPE_DIRECTORY"]) for argv, env, stdin, _ in runner.calls[1:]]
    pipe = str(tmp_path / "pipe")
    assert commands == [
        (["/usr/bin/nvidia-cuda-mps-control"], "set_default_active_thread_percentage 40\n", pipe),
        (["/usr/bin/nvidia-cuda-mps-control"], "get_server_list\n", pipe),
        (["/usr/bin/nvidia-cuda-mps-control"], "set_active_thread_percentage 4242 60\n", pipe),
        (["/usr/bin/nvidia-cuda-mps-control"], "quit\n", pipe),
    ]


def test_a_pid_that_is_not_an_mps_server_gets_no_share(tmp_path: Path) -> None:
    """A model server's pid is a CUDA client: its share is fixed at its start, so nothing is sent for it."""
    runner = FakeRunner(answers={"get_server_list\n": RunResult(0, "4242\n", "")})
    mps = make_mps(runner)
    mps.start(0, tmp_path / "pipe", tmp_path / "log")
    with pytest.raises(GpuError, match=r"^GPU 0: set active thread percentage of server 777: pid 777 is not an MPS "
                                       r"server of this GPU \(servers: 4242\); a client's share is fixed when it "
                                       r"starts$"):
        mps.set_active_thread_pct(0, 777, 30)
    assert [stdin for _, _, stdin, _ in runner.calls[1:]] == ["get_server_list\n"]


@pytest.mark.parametrize("pct", [0, 101, -5, 50.5, True, "50"])
def test_bad_percentages_are_refused_before_running_anything(tmp_path: Path, pct: object) -> None:
    runner = FakeRunner()
    mps = make_mps(runner)
    mps.start(0, tmp_path / "pipe", tmp_path / "log")
    with pytest.raises(GpuError, match=r"^GPU 0: MPS active thread percentage = .* must be an integer from 1 to 100$"):
        mps.set_default_active_thread_pct(0, pct)  # type: ignore[arg-type]
    with pytest.raises(GpuError, match="must be an integer from 1 to 100"):
        mps.set_active_thread_pct(0, 123, pct)  # type: ignore[arg-type]
    assert len(runner.calls) == 1


@pytest.mark.parametrize("pid", [0, -1, 1.5, None])
def test_bad_pids_are_refused(tmp_path: Path, pid: object) -> None:
    mps = make_mps(FakeRunner())
    mps.start(0, tmp_path / "pipe", tmp_path / "log")
    with pytest.raises(GpuError, match=r"^GPU 0: MPS server pid = .* must be a positive integer$"):
        mps.set_active_thread_pct(0, pid, 50)  # type: ignore[arg-type]


def test_commands_need_a_started_daemon_and_failures_are_one_line(tmp_path: Path) -> None:
    runner = FakeRunner(RunResult(1, "", "An instance of this daemon is already running\nmore\n"))
    mps = make_mps(runner)
    with pytest.raises(GpuError, match=r"^GPU 0: set default .*: no MPS control daemon was started"):
        mps.set_default_active_thread_pct(0, 50)
    with pytest.raises(GpuError, match=r"^GPU 0: start MPS: .* exited with status 1: An instance of this daemon "
                                       r"is already running$"):
        mps.start(0, tmp_path / "pipe", tmp_path / "log")


def test_simulated_mps_records_what_it_was_told(tmp_path: Path) -> None:
    mps = SimulatedMps(count=2)
    assert mps.daemon(0) is None
    mps.start(0, tmp_path / "pipe", tmp_path / "log")
    mps.start(0, tmp_path / "pipe", tmp_path / "log")
    mps.set_default_active_thread_pct(0, 30)
    mps.set_active_thread_pct(0, 101, 70)
    mps.set_active_thread_pct(0, 102, 20)
    daemon = mps.daemon(0)
    assert daemon is not None
    assert (daemon.pipe_dir, daemon.log_dir) == (tmp_path / "pipe", tmp_path / "log")
    assert daemon.default_pct == 30
    assert dict(daemon.server_pct) == {101: 70, 102: 20}
    assert mps.daemon(1) is None
    mps.stop(0)
    mps.stop(0)
    assert mps.daemon(0) is None


def test_simulated_mps_validates_like_the_real_one(tmp_path: Path) -> None:
    mps = SimulatedMps(count=1)
    with pytest.raises(GpuError, match=r"^GPU 0: set default active thread percentage: no MPS control daemon"):
        mps.set_default_active_thread_pct(0, 50)
    mps.start(0, tmp_path / "pipe", tmp_path / "log")
    with pytest.raises(GpuError, match=r"^GPU 0: MPS active thread percentage = 0 must be"):
        mps.set_default_active_thread_pct(0, 0)
    with pytest.raises(GpuError, match=r"^GPU 0: MPS server pid = -3"):
        mps.set_active_thread_pct(0, -3, 50)
    with pytest.raises(GpuError, match="already runs with pipe dir"):
        mps.start(0, tmp_path / "other", tmp_path / "log")
    with pytest.raises(GpuError, match=r"^GPU 1: no such GPU"):
        mps.start(1, tmp_path / "pipe", tmp_path / "log")


def test_a_runner_failure_names_the_gpu_and_operation(tmp_path: Path) -> None:
    def timing_out(argv: Sequence[str], *, env: Mapping[str, str], stdin: str, timeout_s: float) -> RunResult:
        raise GpuError(f"{argv[0]} did not finish within {timeout_s:g} s")

    mps = NvidiaMps(executable="nvidia-cuda-mps-control", run=timing_out, timeout_s=2.0, base_env={})
    with pytest.raises(GpuError, match=r"^GPU 3: start MPS: nvidia-cuda-mps-control did not finish within 2 s$"):
        mps.start(3, tmp_path / "pipe", tmp_path / "log")


def test_the_real_runner_runs_argv_without_a_shell() -> None:
    result = run_command(["sh", "-c", "read line; echo \"got $line $FESTINA_TEST\""], env={"FESTINA_TEST": "env",
                         "PATH": "/usr/bin:/bin"}, stdin="quit\n", timeout_s=10)
    assert result == RunResult(0, "got quit env\n", "")
    with pytest.raises(GpuError, match=r"^sleep did not finish within 0.1 s$"):
        run_command(["sleep", "5"], env={"PATH": "/usr/bin:/bin"}, stdin="", timeout_s=0.1)
    with pytest.raises(GpuError, match=r"^cannot run /nonexistent/mps-control: No such file or directory$"):
        run_command(["/nonexistent/mps-control"], env={}, stdin="", timeout_s=1)
