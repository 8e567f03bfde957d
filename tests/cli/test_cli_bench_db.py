"""``festina bench db`` at a tiny N (CI never runs the million-sample default): the JSON keys the issue
names, figures that are rates and latencies, progress on stderr, and a PostgreSQL that does not answer as a
one-line error before any work."""

from __future__ import annotations

import json
import os
import socket

import psycopg
import pytest
from sqlalchemy.engine import make_url

from festina_hpc.db.accounting import query_names
from tests.cli.conftest import Festina
from tests.db.conftest import ADMIN_URL


def _postgres_answers() -> bool:
    try:
        psycopg.connect(make_url(ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False),
                        connect_timeout=5).close()
    except psycopg.OperationalError:
        if os.environ.get("FESTINA_REQUIRE_POSTGRES") == "1":
            raise
        return False
    return True


def test_bench_db_json_has_the_rates_and_the_slowest_report(festina: Festina) -> None:
    postgres = _postgres_answers()
    args = ["--postgres-url", ADMIN_URL] if postgres else ["--no-postgres"]
    result = festina("bench", "db", "--samples", "3000", "--batch-size", "1000", "--json", *args)
    assert result.code == 0, result.err
    figures = json.loads(result.out)
    assert {"sqlite_ingest_per_s", "postgresql_ingest_per_s", "report_max_s"} <= set(figures)
    assert figures["samples"] == 3000 and figures["sqlite_ingest_per_s"] > 0
    assert (figures["postgresql_ingest_per_s"] is not None) == postgres
    runs = figures["reports_s"]["sqlite"]
    queries = 2 * len(query_names())  # every shipped query over two ranges
    assert len(runs) == queries and figures["report_max_s"] == max(
        s for backend in figures["reports_s"].values() for s in backend.values())
    assert 0 < figures["report_max_s"] < 1.0
    # Progress on stderr (plain lines: not a terminal), stdout only the JSON.
    assert "festina bench db: sqlite ingest started (3,000 samples)\n" in result.err
    assert "festina bench db: sqlite ingest done: 3,000/3,000 samples (100%), " in result.err
    assert (f"festina bench db: postgresql reports done: {queries}/{queries} queries" in result.err) == postgres


def test_bench_db_table(festina: Festina) -> None:
    result = festina("bench", "db", "--samples", "500", "--no-postgres")
    assert result.code == 0 and "samples/s" in result.out and "slowest report:" in result.out


def test_bench_db_with_a_postgresql_that_does_not_answer_is_one_line(festina: Festina) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = festina("bench", "db", "--samples", "200", "--postgres-url", f"postgresql://u:pw@127.0.0.1:{port}/x")
    assert result.code == 2 and result.err.startswith(
        f"festina: error: database postgresql+psycopg://u:***@127.0.0.1:{port}/x does not answer: ")
    assert result.err.count("\n") == 1


@pytest.mark.parametrize("samples", ["0", "many"])
def test_bench_db_refuses_a_bad_sample_count(festina: Festina, samples: str) -> None:
    result = festina("bench", "db", "--samples", samples)
    assert result.code == 2 and result.err.startswith("festina: error: Invalid value for '--samples'")
