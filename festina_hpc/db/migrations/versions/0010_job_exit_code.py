"""How each Slurm job ended: ``slurm_jobs.exit_code`` and ``exit_signal`` (Slurm's ``ExitCode=<code>:<signal>``).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

festinad's reconcile writes them with the job's final state and end time. Rows recorded before this
revision get NULL: their exit code was not kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("slurm_jobs") as batch:
        batch.add_column(sa.Column("exit_code", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("exit_signal", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("slurm_jobs") as batch:
        batch.drop_column("exit_signal")
        batch.drop_column("exit_code")
