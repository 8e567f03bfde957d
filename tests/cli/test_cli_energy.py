"""``festina energy report|query|plot`` and ``festina db prune`` on SQLite and PostgreSQL: the fixture's
hand-worked figures in every format, PNG plots, and one-line errors (exit 2) for bad dates, an unknown --by,
a database that does not answer or is not migrated."""

from __future__ import annotations

import csv
import io
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from festina_hpc.db.accounting import REPORTS
from festina_hpc.db.store import Store
from tests.cli.conftest import NOT_A_TIME, Festina
from tests.conftest import write_config
from tests.db import accounting_fixture as fx
from tests.db.conftest import backend, db_url, engine, migrated, postgres_url, store  # noqa: F401

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_db_url_from_the_caller(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FESTINA_DB_URL", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def url(store: Store, migrated: Engine, db_url: URL) -> str:  # noqa: F811
    """The URL of a database holding the accounting fixture."""
    fx.load(store)
    return db_url.render_as_string(hide_password=False)


def report(festina: Festina, url: str, *args: str) -> dict[str, Any]:
    result = festina("energy", "report", *args, "--format", "json", "--db-url", url)
    assert (result.code, result.err) == (0, ""), result.err
    return dict(json.loads(result.out))


@pytest.mark.parametrize(("by", "first_row"), [
    ("job", {"job_id": 101, "user_name": "alice", "account": "proj1", "energy_j": 9000.0,
             "from_at": "2026-03-01T12:00:00+00:00", "to_at": "2026-03-01T13:01:00+00:00"}),
    ("model", {"model": "llama-3.1-8b", "energy_j": 9400.0, "output_tokens": 470, "energy_per_output_token_j": 20.0}),
    # user and account charge as tenant does: A's hour 12 to alice's requests, its hour 13 to job 101's proj1/alice.
    ("user", {"user_name": "alice", "accounts": 1, "requests": 4, "tokens": 600, "energy_j": 9000.0}),
    ("account", {"account": "proj1", "requests": 4, "tokens": 600, "energy_j": 9000.0}),
    # A's 1800 J of hour 12 to alice's 4 requests, its 7200 J of hour 13 (no requests) to its job's proj1/alice.
    ("tenant", {"account": "proj1", "user_name": "alice", "requests": 4, "tokens": 600, "energy_j": 9000.0}),
    ("node", {"node": "n01", "energy_j": 10800.0, "idle_energy_j": 900.0}),
    ("day", {"day_at": "2026-03-01T00:00:00+00:00", "energy_j": 12600.0, "idle_energy_j": 2400.0}),
])
def test_report_by_each_dimension_as_json(festina: Festina, url: str, by: str, first_row: dict[str, Any]) -> None:
    data = report(festina, url, "--by", by)
    assert (data["by"], data["query"], data["since"], data["until"]) == (by, REPORTS[by], None, None)
    assert set(first_row) <= set(data["columns"])
    assert {key: data["rows"][0][key] for key in first_row} == first_row


def test_report_range_limits_the_rows(festina: Festina, url: str) -> None:
    data = report(festina, url, "--by", "account", "--since", "2026-03-02", "--until", "2026-03-03T00:00Z")
    assert data["since"] == "2026-03-02T00:00:00+00:00" and data["until"] == "2026-03-03T00:00:00+00:00"
    assert [(r["account"], r["energy_j"]) for r in data["rows"]] == [("proj2", 100.0)]
    assert [r["job_id"] for r in report(festina, url, "--by", "job", "--limit", "1")["rows"]] == [101]


def test_report_as_csv_and_as_a_table(festina: Festina, url: str) -> None:
    result = festina("energy", "report", "--by", "job", "--format", "csv", "--db-url", url)
    rows = list(csv.DictReader(io.StringIO(result.out)))
    assert [(r["job_id"], r["energy_j"], r["from_at"]) for r in rows] == [
        ("101", "9000.0", "2026-03-01T12:00:00+00:00"), ("102", "1300.0", "2026-03-01T12:00:00+00:00")]
    table = festina("energy", "report", "--by", "user", "--db-url", url)
    assert table.code == 0 and "GPU energy by user, the beginning to now" in table.out
    assert "alice" in table.out and "9,000.0" in table.out and "0.0025" in table.out  # 9000 J in kWh


def test_any_shipped_query_runs_by_name(festina: Festina, url: str) -> None:
    result = festina("energy", "query", "slo_attainment_per_model", "--format", "json", "--db-url", url)
    rows = json.loads(result.out)["rows"]
    assert [(r["model"], r["slo_attainment"]) for r in rows] == [("llama-3.1-8b", 0.6), ("mistral-7b", 1.0)]
    # The Slurm job's account per day, which --by account was before it charged the gateway accounts.
    result = festina("energy", "query", "energy_by_account_day", "--format", "json", "--db-url", url)
    assert [(r["account"], r["day_at"], r["energy_j"]) for r in json.loads(result.out)["rows"]] == [
        ("proj1", "2026-03-01T00:00:00+00:00", 9000.0), ("proj2", "2026-03-01T00:00:00+00:00", 1200.0),
        ("proj2", "2026-03-02T00:00:00+00:00", 100.0)]


@pytest.mark.parametrize("what", ["model", "node"])
def test_plot_writes_a_png(festina: Festina, url: str, tmp_path: Path, what: str) -> None:
    out = tmp_path / f"{what}.png"
    result = festina("energy", "plot", "--what", what, "--out", str(out), "--db-url", url)
    assert result.code == 0, result.err
    expected = "2 models, 4 hourly points" if what == "model" else "2 nodes, 4 hourly points"
    assert result.out == f"{out}: {expected}\n"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_db_prune_keeps_the_reports(festina: Festina, url: str) -> None:
    before = report(festina, url, "--by", "day")
    result = festina("db", "prune", "--older-than-days", "1", "--json", "--db-url", url)
    assert result.code == 0, result.err
    assert {k: v for k, v in json.loads(result.out).items() if k in ("samples", "shares", "retention_days")} == {
        "samples": 8, "shares": 5, "retention_days": 1}
    assert report(festina, url, "--by", "day") == before


def test_db_prune_with_retention_off_prunes_nothing(festina: Festina, url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "festina.toml", "[db]\nsample_retention_days = 0\n")
    result = festina("--config", str(config), "db", "prune", "--db-url", url)
    assert (result.code, result.out.endswith("retention is off (db.sample_retention_days = 0): nothing pruned\n")) == (
        0, True)


# -- bad input: one line, exit 2 (SQLite only: the checks come before or without the database) -----------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(("args", "message"), [
    (["report", "--by", "account", "--since", "last week"],
     "festina: error: Invalid value for '--since': 'last week' " + NOT_A_TIME + "\n"),
    (["report", "--by", "day", "--until", "2026-02-30"],
     "festina: error: Invalid value for '--until': '2026-02-30' is not a time (ISO 8601"),
    (["query", "energy_by_day", "--since", "1h30"],
     "festina: error: Invalid value for '--since': '1h30' is not a time"),
    (["plot", "--what", "model", "--out", "x.png", "--until", "30m1h"],
     "festina: error: Invalid value for '--until': '30m1h' is not a time"),
    (["report", "--by", "day", "--since", "2026-03-02", "--until", "2026-03-01"],
     "festina: error: Invalid value for '--since': 2026-03-02T00:00:00+00:00 is not before --until "
     "(2026-03-01T00:00:00+00:00)\n"),
    (["report", "--by", "day", "--since", "1h", "--until", "2h"],
     "festina: error: Invalid value for '--since': "),
    (["report", "--by", "gpu"], "festina: error: Invalid value for '--by': 'gpu' is not one of "),
    (["report", "--by", "day", "--format", "xml"], "festina: error: Invalid value for '--format': 'xml'"),
    (["plot", "--what", "gpu", "--out", "x.png"], "festina: error: Invalid value for '--what': 'gpu'"),
])
def test_bad_input_is_one_line_exit_2(festina: Festina, tmp_path: Path, args: list[str], message: str) -> None:
    result = festina("energy", *args, "--db-url", f"sqlite:///{tmp_path / 'absent-dir' / 'f.db'}")
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith(message) and result.err.count("\n") == 1, result.err


def test_a_database_that_does_not_answer_is_one_line_exit_2(festina: Festina) -> None:
    port = _closed_port()
    result = festina("energy", "report", "--by", "day", "--db-url", f"postgresql://acct:s3cret@127.0.0.1:{port}/f")
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith(f"festina: error: database postgresql+psycopg://acct:***@127.0.0.1:{port}/f "
                                 "does not answer: ")
    assert result.err.count("\n") == 1 and "s3cret" not in result.err


def test_a_database_not_migrated_says_to_upgrade(festina: Festina, tmp_path: Path) -> None:
    result = festina("energy", "report", "--by", "day", "--db-url", f"sqlite:///{tmp_path / 'new.db'}")
    assert result.code == 2 and result.err.endswith("run `festina db upgrade`\n") and result.err.count("\n") == 1


def test_plot_of_an_empty_range_and_an_unwritable_file_are_one_line_errors(festina: Festina, url: str,
                                                                           tmp_path: Path) -> None:
    empty = festina("energy", "plot", "--what", "model", "--out", str(tmp_path / "m.png"), "--since", "2030-01-01",
                    "--db-url", url)
    assert empty.code == 2 and "no energy recorded in 2030-01-01T00:00+00:00 to now: nothing to plot" in empty.err
    bad = festina("energy", "plot", "--what", "node", "--out", str(tmp_path / "no" / "dir" / "n.png"),
                  "--db-url", url)
    assert bad.code == 2 and bad.err.startswith("festina: error: --out = ") and bad.err.count("\n") == 1
