"""The hook log under hostile job environments: the hooks run as functions and as the Slurm scripts themselves.

A value from the job's environment reaches the log only escaped, on the line of the record that carries it;
bad input is one line naming the variable (never a traceback); the task prolog's refusals are logged; the
hooks exit 0 whatever they are given.
"""

from __future__ import annotations

import io
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from festina_hpc.node.config import NodeConfig
from festina_hpc.node.hookenv import HookLogFormatter
from festina_hpc.node.main import HOOK_LOG_FORMAT, Invocation, log_handler, run_hook
from tests.node.test_hookenv import PROLOG_MPS

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "slurm_plugins"
FORGED = "2026-12-07T10:00:00 prolog job=9 node=n1 gpus=0 mps=25"
NEWLINE_ID = f"8\n{FORGED}"
LONG_ID = "1" * 100_000
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} festina-node\[\d+\] [A-Z]+ ")


def never_build(_inv: Invocation) -> object:
    raise AssertionError("bad input must stop a hook before it touches the node")


def hook_records(caplog: pytest.LogCaptureFixture, hook: str, env: dict[str, str],
                 out: io.StringIO | None = None) -> list[logging.LogRecord]:
    inv = Invocation(NodeConfig(), "n2", env, None)
    with caplog.at_level(logging.INFO, logger="festina_hpc.node"):
        assert run_hook(inv, hook, out=out, build=never_build) == 0  # type: ignore[arg-type]
    return [r for r in caplog.records if r.name.startswith("festina_hpc.node")]


@pytest.mark.parametrize("hook", ["prolog", "epilog", "task-prolog"])
def test_a_newline_in_the_job_id_is_one_escaped_line(caplog: pytest.LogCaptureFixture, hook: str) -> None:
    [record] = hook_records(caplog, hook, {**PROLOG_MPS, "SLURM_JOB_ID": NEWLINE_ID})
    line = HookLogFormatter(HOOK_LOG_FORMAT).format(record)
    assert "\n" not in line and record.exc_info is None
    assert f"{hook}: nothing done (fail open, node stays up): hook environment: SLURM_JOB_ID '8\\n2026" in line


@pytest.mark.parametrize("hook", ["prolog", "epilog", "task-prolog"])
def test_a_100000_digit_job_id_is_a_one_line_reason(caplog: pytest.LogCaptureFixture, hook: str) -> None:
    [record] = hook_records(caplog, hook, {**PROLOG_MPS, "SLURM_JOB_ID": LONG_ID})
    line = HookLogFormatter(HOOK_LOG_FORMAT).format(record)
    assert record.exc_info is None and "Traceback" not in line
    assert "SLURM_JOB_ID '1111" in line and "... (100000 chars) is not a number in 1..4294967295" in line
    assert len(line) < 300


def test_the_task_prolog_logs_what_it_refuses_to_export(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    records = hook_records(caplog, "task-prolog", {**PROLOG_MPS, "SLURM_JOB_GPUS": "0,1"}, out)
    assert out.getvalue() == ""
    refusals = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert refusals == ["task-prolog job 8: no MPS variables exported: an MPS share of 25% on 2 GPUs [0, 1] "
                        "(one MPS daemon per GPU)"]


def test_a_whole_gpu_job_is_no_task_prolog_refusal(caplog: pytest.LogCaptureFixture) -> None:
    env = {k: v for k, v in PROLOG_MPS.items() if k != "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"}
    records = hook_records(caplog, "task-prolog", env, io.StringIO())
    assert [r.getMessage() for r in records] == ["task-prolog job=8 node=n2 gpus=0 mps="]


def test_an_unforeseen_parse_failure_is_one_line_too(caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_env: object) -> object:
        raise ValueError("Exceeds the limit (4300 digits)\nfor integer string conversion")

    monkeypatch.setattr("festina_hpc.node.main.job_context", broken)
    [record] = hook_records(caplog, "prolog", PROLOG_MPS)
    assert record.exc_info is None
    assert "\n" not in HookLogFormatter(HOOK_LOG_FORMAT).format(record)


def test_syslog_gets_the_same_one_line_records(tmp_path: Path) -> None:
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        handler = log_handler(address)
        try:
            handler.handle(logging.LogRecord("festina_hpc.node", logging.WARNING, __file__, 1, "job %s", ("8\nx",),
                                             None))
            datagram = server.recv(4096).decode()
        finally:
            handler.close()
    assert datagram.startswith("<12>festina-node[") and datagram.endswith("WARNING job 8\\nx\x00")


def test_without_syslog_the_handler_is_stderr() -> None:
    handler = log_handler("/nonexistent/festina/log")
    assert isinstance(handler, logging.StreamHandler) and isinstance(handler.formatter, HookLogFormatter)


# -- the scripts, as Slurm runs them -----------------------------------------------------------------------------


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    """slurm.conf's folder as the hooks see it: festina-node.path names this worktree's festina-node."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "slurm.conf").write_text("")
    (etc / "festina-node.toml").write_text(f'[node]\nstate_dir = "{tmp_path}/node"\ngpu_backend = "simulated"\n')
    wrapper = tmp_path / "festina-node"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m festina_hpc.node.main "$@"\n')
    wrapper.chmod(0o755)
    (etc / "festina-node.path").write_text(f"{wrapper}\n")
    (etc / "festina-hooks.log").write_text("")
    return etc


def run_script(conf_dir: Path, script: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], str]:
    done = subprocess.run([str(PLUGINS / script)], env={**env, "SLURM_CONF": str(conf_dir / "slurm.conf")},
                          capture_output=True, text=True, timeout=60, check=False)
    return done, (conf_dir / "festina-hooks.log").read_text()


@pytest.mark.parametrize("script", ["prolog", "epilog", "task_prolog"])
def test_a_newline_in_the_job_id_forges_no_line_in_the_hook_log(conf_dir: Path, script: str) -> None:
    done, log = run_script(conf_dir, script, {**PROLOG_MPS, "SLURM_JOB_ID": NEWLINE_ID})
    assert done.returncode == 0 and done.stdout == ""
    lines = log.splitlines()
    assert len(lines) == 1 and RECORD.match(lines[0]), log
    assert "SLURM_JOB_ID '8\\n2026-12-07T10:00:00 prolog job=9" in lines[0]


@pytest.mark.parametrize("script", ["prolog", "task_prolog"])
def test_a_100000_digit_job_id_logs_one_line_and_no_traceback(conf_dir: Path, script: str) -> None:
    done, log = run_script(conf_dir, script, {**PROLOG_MPS, "SLURM_JOB_ID": LONG_ID})
    assert done.returncode == 0 and "Traceback" not in log
    [line] = log.splitlines()
    assert "SLURM_JOB_ID" in line and "(100000 chars)" in line and len(line) < 300


def test_the_task_prolog_script_logs_its_refusal(conf_dir: Path) -> None:
    done, log = run_script(conf_dir, "task_prolog", {**PROLOG_MPS, "SLURM_JOB_GPUS": "0,1"})
    assert done.returncode == 0 and done.stdout == ""
    assert "task-prolog job 8: no MPS variables exported: an MPS share of 25% on 2 GPUs" in log


def test_the_scripts_log_the_validated_run_line(conf_dir: Path) -> None:
    done, log = run_script(conf_dir, "task_prolog", PROLOG_MPS)
    assert done.returncode == 0 and "export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25" in done.stdout
    done, log = run_script(conf_dir, "epilog", PROLOG_MPS)
    assert done.returncode == 0
    assert "task-prolog job=8 node=n2 gpus=0 mps=25" in log and "epilog job=8 node=n2 gpus=0 mps=25" in log
    assert all(RECORD.match(line) for line in log.splitlines()), log


def test_hook_scripts_write_no_value_from_the_environment_themselves() -> None:
    for script in ("prolog", "epilog", "task_prolog"):
        text = (PLUGINS / script).read_text()
        assert not re.search(r"\$\{?(SLURM_JOB|SLURMD_|CUDA_)", text), script


def test_the_hook_log_has_festinas_lines_only_with_a_database(conf_dir: Path, tmp_path: Path) -> None:
    """With a database configured the hooks write through the store: the hook log gets no line of the libraries
    under it (the migration tool's plugin setup and context lines were 140 of 202 hook log lines)."""
    from festina_hpc.db import migrate
    from festina_hpc.db.engine import make_engine

    url = f"sqlite:///{tmp_path / 'festina.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    toml = conf_dir / "festina-node.toml"
    toml.write_text(toml.read_text() + f'db_url = "{url}"\n')
    for script in ("prolog", "task_prolog", "epilog"):
        done, log = run_script(conf_dir, script, PROLOG_MPS)
        assert done.returncode == 0
    lines = log.splitlines()
    assert all(RECORD.match(line) for line in lines), log
    # festina-node's own lines each name the hook or the node they are about
    messages = [RECORD.sub("", line) for line in lines]
    assert all(m.split(" ")[0] in ("prolog", "task-prolog", "epilog", "n2", "n2:") for m in messages), log
    assert [m for m in messages if m.startswith(("prolog job=", "task-prolog job=", "epilog job="))] == [
        f"{hook} job=8 node=n2 gpus=0 mps=25" for hook in ("prolog", "task-prolog", "epilog")]
