"""Repeated decisions counted, not copied: ``decisions.times_decided`` and ``decisions.last_decided_at``.

A policy that decides the same thing every period (power off the same empty nodes every 30 s) wrote a
row each time; the store now counts an unchanged decision on the latest row for its target instead.
Rows recorded before this revision were each decided once, last at their ``decided_at``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("times_decided", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("last_decided_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE decisions SET last_decided_at = decided_at")
    with op.batch_alter_table("decisions") as batch:
        batch.alter_column("last_decided_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.create_check_constraint(op.f("ck_decisions_times_decided_positive"), "times_decided >= 1")
        batch.create_index(op.f("ix_decisions_last_decided_at"), ["last_decided_at"])
        batch.create_index(op.f("ix_decisions_kind_node_id_gpu_id"), ["kind", "node_id", "gpu_id"])


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.drop_index(op.f("ix_decisions_kind_node_id_gpu_id"))
        batch.drop_index(op.f("ix_decisions_last_decided_at"))
        batch.drop_constraint(op.f("ck_decisions_times_decided_positive"), type_="check")
        batch.drop_column("last_decided_at")
        batch.drop_column("times_decided")
