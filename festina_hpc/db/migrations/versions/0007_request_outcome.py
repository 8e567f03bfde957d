"""How each request ended: the gateway's outcome (``festina_hpc.daemon.records.Outcome``) on its row.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

Rows recorded before this revision get NULL: their outcome was not kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("outcome", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("outcome")
