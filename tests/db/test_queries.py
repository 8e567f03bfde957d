"""The accounting queries (``db/queries/*.sql``) on SQLite and PostgreSQL: each returns the hand-worked figures
of the accounting fixture; each file is one statement whose parameters its header documents; they ship in
the package and ``db/queries`` is the same folder."""

from __future__ import annotations

import configparser
import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from festina_hpc.db.accounting import (
    QUERIES_DIR,
    REPORTS,
    QueryError,
    load_query,
    parse_query,
    query_names,
    run_query,
)
from festina_hpc.db.store import Store
from tests.db import accounting_fixture as fx

REPO = Path(__file__).resolve().parents[2]
EXPECTED_QUERIES = {"energy_by_account", "energy_by_account_day", "energy_by_model_hour", "energy_per_token_per_model",
                    "slo_attainment_per_model", "top_jobs_by_energy", "idle_energy_per_node", "energy_by_user",
                    "energy_by_day", "power_per_node_hour", "energy_by_tenant"}


@pytest.fixture
def loaded(store: Store, migrated: Engine) -> Engine:
    fx.load(store)
    return migrated


def rows(engine: Engine, name: str, **params: Any) -> list[dict[str, Any]]:
    return run_query(engine, name, **params).as_dicts()


def test_energy_by_account_day(loaded: Engine) -> None:
    """The Slurm job's account per day (a shipped query, no longer --by account)."""
    assert rows(loaded, "energy_by_account_day") == [
        {"account": "proj1", "day_at": fx.DAY1, "energy_j": 9000.0, "energy_kwh": pytest.approx(9000 / 3.6e6)},
        {"account": "proj2", "day_at": fx.DAY1, "energy_j": 1200.0, "energy_kwh": pytest.approx(1200 / 3.6e6)},
        {"account": "proj2", "day_at": fx.DAY2, "energy_j": 100.0, "energy_kwh": pytest.approx(100 / 3.6e6)},
    ]
    assert [r["account"] for r in rows(loaded, "energy_by_account_day", since=fx.DAY2)] == ["proj2"]


def test_energy_by_account(loaded: Engine) -> None:
    # A's hour 12 to alice's (proj1) requests, its hour 13 (none) to job 101's proj1; B's and C's to bob's proj2
    # requests, except C's hour 12 (none) to job 102's proj2.
    assert rows(loaded, "energy_by_account") == [
        {"account": "proj1", "requests": 4, "tokens": 600, "energy_j": 9000.0,
         "energy_kwh": pytest.approx(9000 / 3.6e6), "energy_per_token_j": 15.0},
        {"account": "proj2", "requests": 3, "tokens": 600, "energy_j": 1300.0,
         "energy_kwh": pytest.approx(1300 / 3.6e6), "energy_per_token_j": pytest.approx(1300 / 600)},
    ]
    assert [(r["account"], r["energy_j"]) for r in rows(loaded, "energy_by_account", since=fx.DAY2)] == [
        ("proj2", 100.0)]


def test_energy_by_user(loaded: Engine) -> None:
    assert [(r["user_name"], r["accounts"], r["requests"], r["tokens"], r["energy_j"])
            for r in rows(loaded, "energy_by_user")] == [("alice", 1, 4, 600, 9000.0), ("bob", 1, 3, 600, 1300.0)]
    assert [(r["user_name"], r["energy_j"]) for r in rows(loaded, "energy_by_user", since=fx.H13, until=fx.DAY2)] == [
        ("alice", 7200.0)]


@pytest.mark.parametrize(("since", "until"), [(fx.DAY1, fx.DAY2), (fx.DAY2, fx.DAY2 + (fx.DAY2 - fx.DAY1)),
                                              (fx.H13, fx.H12_NEXT), (fx.DAY1, fx.H12_NEXT + (fx.H13 - fx.H12))])
def test_accounts_users_and_tenants_plus_idle_are_the_node_energy(loaded: Engine, since: Any, until: Any) -> None:
    """Every joule of an instance is charged to someone: the sum over accounts (users, tenants) plus idle
    energy is the nodes' energy over any range of whole hours."""
    nodes = rows(loaded, "power_per_node_hour", since=since, until=until)
    node_j, idle_j = sum(r["energy_j"] for r in nodes), sum(r["idle_energy_j"] for r in nodes)
    assert node_j > 0
    for name in ("energy_by_account", "energy_by_user", "energy_by_tenant"):
        charged_j = sum(r["energy_j"] for r in rows(loaded, name, since=since, until=until))
        assert charged_j + idle_j == pytest.approx(node_j, rel=1e-9), name


def test_energy_by_model_hour(loaded: Engine) -> None:
    got = {(r["model"], r["hour_at"]): r["energy_j"] for r in rows(loaded, "energy_by_model_hour")}
    assert got == fx.MODEL_HOUR_J
    within = rows(loaded, "energy_by_model_hour", since=fx.H13, until=fx.H12_NEXT)
    assert [(r["model"], r["hour_at"], r["energy_j"]) for r in within] == [("llama-3.1-8b", fx.H13, 7200.0)]


def test_energy_per_token_per_model(loaded: Engine) -> None:
    assert rows(loaded, "energy_per_token_per_model") == [
        {"model": "llama-3.1-8b", "energy_j": 9400.0, "requests": 5, "prompt_tokens": 230, "output_tokens": 470,
         "energy_per_output_token_j": 20.0, "energy_per_token_j": pytest.approx(9400 / 700)},
        {"model": "mistral-7b", "energy_j": 900.0, "requests": 2, "prompt_tokens": 200, "output_tokens": 300,
         "energy_per_output_token_j": 3.0, "energy_per_token_j": 1.8},
    ]
    day_one = rows(loaded, "energy_per_token_per_model", since=fx.DAY1, until=fx.DAY2)
    assert (day_one[0]["energy_j"], day_one[0]["output_tokens"], day_one[0]["energy_per_output_token_j"]) == (
        9300.0, 400, 23.25)


def test_slo_attainment_per_model(loaded: Engine) -> None:
    assert rows(loaded, "slo_attainment_per_model") == [
        {"model": "llama-3.1-8b", "requests": 5, "slo_met": 3, "slo_attainment": 0.6,
         "mean_ttft_s": pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 2.0) / 5), "max_ttft_s": 2.0, "mean_tbt_s": None},
        {"model": "mistral-7b", "requests": 2, "slo_met": 2, "slo_attainment": 1.0, "mean_ttft_s": pytest.approx(0.3),
         "max_ttft_s": 0.3, "mean_tbt_s": None},
    ]
    assert rows(loaded, "slo_attainment_per_model", since=fx.DAY2)[0]["slo_attainment"] == 0.0


def test_top_jobs_by_energy(loaded: Engine) -> None:
    got = rows(loaded, "top_jobs_by_energy", limit=10)
    assert [(r["job_id"], r["user_name"], r["account"], r["energy_j"], r["from_at"], r["to_at"]) for r in got] == [
        (101, "alice", "proj1", 9000.0, fx.T0, fx.at(3660)), (102, "bob", "proj2", 1300.0, fx.T0, fx.at(86400))]
    assert [r["job_id"] for r in rows(loaded, "top_jobs_by_energy", limit=1)] == [101]
    assert [r["job_id"] for r in rows(loaded, "top_jobs_by_energy", limit=10, since=fx.DAY2)] == [102]


def test_idle_energy_per_node(loaded: Engine) -> None:
    assert [(r["node"], r["energy_j"], r["idle_energy_j"], r["idle_fraction"])
            for r in rows(loaded, "idle_energy_per_node")] == [
        ("n01", 10800.0, 900.0, pytest.approx(900 / 10800)), ("n02", 1900.0, 1500.0, pytest.approx(1500 / 1900))]


def test_energy_by_day(loaded: Engine) -> None:
    assert [(r["day_at"], r["energy_j"], r["attributed_energy_j"], r["idle_energy_j"])
            for r in rows(loaded, "energy_by_day")] == [(fx.DAY1, 12600.0, 10200.0, 2400.0),
                                                        (fx.DAY2, 100.0, 100.0, 0.0)]
    total = sum(r["energy_j"] for r in rows(loaded, "energy_by_day"))
    assert total == fx.TOTAL_J


def test_power_per_node_hour(loaded: Engine) -> None:
    got = rows(loaded, "power_per_node_hour")
    assert {(r["node"], r["hour_at"]): (r["energy_j"], r["idle_energy_j"]) for r in got} == fx.NODE_HOUR_J
    assert got[0]["mean_power_w"] == pytest.approx(got[0]["energy_j"] / 3600)


def test_every_query_runs_on_an_empty_database(migrated: Engine) -> None:
    for name in query_names():
        assert run_query(migrated, name, limit=5).rows == [], name


# -- the files themselves -------------------------------------------------------------------------------------


def test_the_shipped_queries_are_the_documented_set_and_each_report_has_one() -> None:
    assert set(query_names()) == EXPECTED_QUERIES
    assert set(REPORTS.values()) <= EXPECTED_QUERIES


@pytest.mark.parametrize("name", sorted(EXPECTED_QUERIES))
def test_each_file_is_one_statement_with_its_parameters_documented(name: str) -> None:
    query = load_query(name)
    assert query.title and {"since", "until"} <= set(query.parameters)
    assert ";" not in query.sql


def test_account_user_and_tenant_charge_with_the_same_statement() -> None:
    """Each file stands alone (operators run them by hand), so the charging CTEs are copies: kept identical."""
    def charging(name: str) -> str:
        sql = load_query(name).sql
        return sql[:sql.index("\nSELECT ", sql.index("charged AS"))]
    assert charging("energy_by_account") == charging("energy_by_tenant") == charging("energy_by_user")


def test_db_queries_in_the_repository_is_the_packaged_folder() -> None:
    assert (REPO / "db" / "queries").resolve() == QUERIES_DIR
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in setup["options.package_data"]["festina_hpc"].splitlines() if p.strip()]
    for path in QUERIES_DIR.glob("*.sql"):
        name = path.relative_to(REPO / "festina_hpc").as_posix()
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


@pytest.mark.parametrize(("case", "source", "message"), [
    ("undocumented parameter", "-- q: x\n--   :since  a\nSELECT 1 WHERE :since < :until",
     "parameters used ['since', 'until'] but documented ['since']"),
    ("two statements", "-- q: x\nSELECT 1; SELECT 2", "more than one statement"),
    ("no title", "SELECT 1", "the first line must be '-- q: <what it answers>'"),
])
def test_a_malformed_query_file_is_refused(case: str, source: str, message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        parse_query("q", source)


def test_unknown_query_and_missing_limit_are_one_line_errors(migrated: Engine) -> None:
    with pytest.raises(QueryError, match=r"^query 'nope' is not one of energy_by_account, energy_by_account_day, "):
        load_query("nope")
    with pytest.raises(QueryError, match=r"^query top_jobs_by_energy needs limit$"):
        run_query(migrated, "top_jobs_by_energy")


