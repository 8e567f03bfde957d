"""festina_hpc.logs: with -v festina's own lines and no library's INFO (the scheduler's runs, the migration
tool), -vv lets those through; a line that recurs unchanged is logged once, then with its count."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from festina_hpc.logs import RepeatedLines, library_level, own_level

REPO = Path(__file__).resolve().parents[1]

# Real libraries at work in a process configured as the commands configure theirs: Alembic migrates a SQLite
# file (its context and "Running upgrade" lines), APScheduler runs a job a few times (its "Running job" lines),
# and festina's own module logs at INFO and DEBUG.
SNIPPET = """
import asyncio, logging, sys
from festina_hpc.logs import configure_logging
configure_logging(int(sys.argv[1]), fmt="%(levelname)s %(name)s: %(message)s")
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from festina_hpc.db import migrate
from festina_hpc.db.engine import make_engine
migrate.upgrade(make_engine("sqlite:///" + sys.argv[2]))
own = logging.getLogger("festina_hpc.daemon.festinad")
async def tick():
    own.info("tick")
async def main():
    scheduler = AsyncIOScheduler()
    scheduler.add_job(tick, "interval", seconds=0.1)
    scheduler.start()
    await asyncio.sleep(0.5)
    scheduler.shutdown()
    own.debug("details")
asyncio.run(main())
"""


def configured_output(verbosity: int, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, "-c", SNIPPET, str(verbosity), str(tmp_path / f"v{verbosity}.db")],
                          capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return done.stderr


def loggers_seen(output: str) -> set[str]:
    return {line.split(" ", 2)[1].rstrip(":") for line in output.splitlines() if line.count(" ") >= 2}


def test_minus_v_logs_festina_at_info_and_no_library_info(tmp_path: Path) -> None:
    output = configured_output(1, tmp_path)
    assert "INFO festina_hpc.daemon.festinad: tick" in output
    assert loggers_seen(output) == {"festina_hpc.daemon.festinad"}, output
    assert "details" not in output


def test_minus_vv_lets_the_libraries_info_through(tmp_path: Path) -> None:
    output = configured_output(2, tmp_path)
    assert "INFO alembic.runtime.migration: Running upgrade" in output
    assert any(name.startswith("apscheduler") for name in loggers_seen(output)), output
    assert "DEBUG festina_hpc.daemon.festinad: details" in output


def test_without_v_only_warnings(tmp_path: Path) -> None:
    assert configured_output(0, tmp_path) == ""


@pytest.mark.parametrize(("verbosity", "quiet", "own", "library"), [
    (0, logging.WARNING, logging.WARNING, logging.WARNING),  # festinad
    (1, logging.WARNING, logging.INFO, logging.WARNING),  # festinad -v, the shipped unit
    (2, logging.WARNING, logging.DEBUG, logging.INFO),
    (0, logging.INFO, logging.INFO, logging.WARNING),  # festina-node's hooks
    (1, logging.INFO, logging.DEBUG, logging.WARNING),
    (3, logging.INFO, logging.DEBUG, logging.INFO),
])
def test_levels(verbosity: int, quiet: int, own: int, library: int) -> None:
    assert (own_level(verbosity, quiet), library_level(verbosity)) == (own, library)


def test_festinad_minus_v_logs_no_migration_lines(tmp_path: Path) -> None:
    """The shipped unit's ``festinad -v`` on a new database: festina's line about the Slurm backend, none of the
    migration tool's; the missing cluster then stops it (a slurm.conf that does not exist)."""
    config = tmp_path / "festina.toml"
    config.write_text('[daemon]\nport = 1\nmetrics_listen = ""\nslurm_timeout_s = 1.0\nslurm_backend = "auto"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_CONF": str(tmp_path / "missing" / "slurm.conf")}
    env.pop("FESTINA_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "festina_hpc.cli.main", "--config", str(config), "daemon",
                           "--db-url", f"sqlite:///{tmp_path / 'festina.db'}", "-v"],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if " festinad " in line]
    assert any("INFO festina_hpc.slurm.factory: using the Slurm CLI backend" in line for line in lines), done.stderr
    assert not [line for line in lines if "alembic" in line or "apscheduler" in line], done.stderr


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_a_recurring_line_is_logged_once_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    lines = RepeatedLines(logging.getLogger("festina_hpc.test"), summary_s=600.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="festina_hpc.test"):
        for _ in range(20):  # every 30 s for 10 minutes
            lines.log(("power", "n2"), logging.INFO, "PowerOff node %s: left to Slurm", "n2")
            lines.log(("power", "n3"), logging.INFO, "PowerOff node %s: left to Slurm", "n3")
            clock.now_s += 30.0
        lines.log(("power", "n2"), logging.INFO, "PowerOff node %s: left to Slurm", "n2")  # 600 s after the first
        lines.log(("power", "n3"), logging.INFO, "PowerOn node %s: queued work", "n3")  # a change
    assert [r.getMessage() for r in caplog.records] == [
        "PowerOff node n2: left to Slurm", "PowerOff node n3: left to Slurm",
        "PowerOff node n2: left to Slurm (repeated 20 times)",
        "PowerOff node n3: left to Slurm (repeated 19 times)", "PowerOn node n3: queued work"]


def test_a_line_back_after_a_change_is_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    lines = RepeatedLines(logging.getLogger("festina_hpc.test"), clock=Clock())
    with caplog.at_level(logging.INFO, logger="festina_hpc.test"):
        for message in ("off", "on", "off", "off"):
            lines.log("n1", logging.INFO, message)
    assert [r.getMessage() for r in caplog.records] == ["off", "on", "off"]
