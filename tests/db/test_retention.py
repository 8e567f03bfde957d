"""festina_hpc.db.retention on SQLite and PostgreSQL: pruning deletes old raw samples and their shares only;
every rollup, and so every report, is unchanged, and the next reading still differences against the last."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select

from festina_hpc.db.accounting import query_names, run_query
from festina_hpc.db.errors import InvalidRecord
from festina_hpc.db.ingest import EnergyReading
from festina_hpc.db.models import EnergySample, EnergySampleShare
from festina_hpc.db.retention import prune_samples, retention_cutoff
from festina_hpc.db.store import Store
from tests.db import accounting_fixture as fx


def _counts(engine: Engine) -> tuple[int, int]:
    with engine.connect() as c:
        return (c.execute(select(func.count()).select_from(EnergySample)).scalar_one(),
                c.execute(select(func.count()).select_from(EnergySampleShare)).scalar_one())


def test_prune_deletes_old_samples_and_keeps_every_report(store: Store, migrated: Engine) -> None:
    instances, readings = fx.build(store)
    store.record_energy(readings)
    n02_gpu0 = readings[3].gpu_id
    before = {name: run_query(migrated, name, limit=10).rows for name in query_names()}
    result = prune_samples(migrated, fx.at(1800))  # the five readings of T0 .. T0+10 min
    assert (result.samples, result.shares, result.before) == (5, 1, fx.at(1800))
    assert _counts(migrated) == (3, 4)
    assert {name: run_query(migrated, name, limit=10).rows for name in query_names()} == before
    assert prune_samples(migrated, fx.at(1800)).samples == 0  # idempotent
    # n02/0's cursor (the next-day 100 J reading) is kept: the next difference is 50 J, not a restart.
    store.record_energy([EnergyReading(n02_gpu0, fx.at(86400 + 60), 150.0, shares={instances["C"]: 1.0})])
    assert run_query(migrated, "top_jobs_by_energy", limit=10).rows[1][5] == 1350.0


@pytest.mark.parametrize(("days", "expected"), [(0, None), (30, datetime(2026, 1, 30, tzinfo=UTC))])
def test_retention_cutoff(days: int, expected: datetime | None) -> None:
    assert retention_cutoff(datetime(2026, 3, 1, tzinfo=UTC), days) == expected


def test_negative_retention_is_refused() -> None:
    with pytest.raises(InvalidRecord, match=r"^sample_retention_days = -1 must be a non-negative integer$"):
        retention_cutoff(datetime(2026, 3, 1, tzinfo=UTC), -1)
