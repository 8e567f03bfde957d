"""Raw-sample retention: delete energy samples older than a cutoff, keeping every rollup and cursor.

Reports read the rollups (see ``festina_hpc.db.ingest``), so raw samples are only needed for
a while (audits, re-deriving a disputed figure); ``[db] sample_retention_days`` says how long.
The per-GPU cursors hold each GPU's last counter, so pruning never turns the next reading's
energy difference into a gap. Pruning is one transaction: all of it happens or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete
from sqlalchemy.exc import DBAPIError

from festina_hpc.db.engine import first_line, mask_url, unavailable
from festina_hpc.db.errors import DatabaseError, InvalidRecord
from festina_hpc.db.models import EnergySample, EnergySampleShare
from festina_hpc.db.validation import check_time


@dataclass(frozen=True)
class PruneResult:
    before: datetime  # samples taken before this were deleted
    samples: int
    shares: int


def retention_cutoff(now: datetime, retention_days: int) -> datetime | None:
    """The time before which samples go, ``retention_days`` before ``now``; None: keep everything (0 days)."""
    if isinstance(retention_days, bool) or not isinstance(retention_days, int) or retention_days < 0:
        raise InvalidRecord(f"sample_retention_days = {retention_days!r} must be a non-negative integer")
    if retention_days == 0:
        return None
    return now - timedelta(days=retention_days)


def prune_samples(engine: Engine, before: datetime) -> PruneResult:
    """Delete the energy samples (and their shares) taken before ``before``; rollups and cursors stay."""
    check_time("prune", "before", before)
    try:
        with engine.begin() as connection:
            shares = connection.execute(delete(EnergySampleShare).where(EnergySampleShare.sampled_at < before))
            samples = connection.execute(delete(EnergySample).where(EnergySample.sampled_at < before))
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise unavailable(engine.url, exc) from None
        raise DatabaseError(f"database {mask_url(engine.url)}: prune failed: {first_line(exc)}") from None
    return PruneResult(before, samples.rowcount, shares.rowcount)


__all__ = ["PruneResult", "prune_samples", "retention_cutoff"]
