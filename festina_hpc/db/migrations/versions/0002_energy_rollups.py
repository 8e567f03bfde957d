"""Energy rollups maintained at ingest: per-GPU cursors, per model per hour, per account per day, per node per hour.

It also drops the foreign key from energy_sample_shares to energy_samples: the ingest writes a
sample and its shares in one transaction, so it holds by construction, and PostgreSQL's row-by-row
check of it was more than half of the ingest's cost (retention deletes shares with their samples).

Existing raw samples seed each GPU's cursor (its latest reading), so the next reading's energy
difference starts where the old data ends; the samples recorded before this revision are not
rolled up (the rollups start empty).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "energy_cursors",
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("sampled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("energy_counter_j", sa.Double(), nullable=False),
        sa.CheckConstraint("energy_counter_j >= 0", name=op.f("ck_energy_cursors_energy_counter_j_non_negative")),
        sa.ForeignKeyConstraint(["gpu_id"], ["gpus.id"], name=op.f("fk_energy_cursors_gpu_id_gpus"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("gpu_id", name=op.f("pk_energy_cursors")),
    )
    op.create_table(
        "model_energy_hourly",
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("hour_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("energy_j", sa.Double(), nullable=False),
        sa.CheckConstraint("energy_j >= 0", name=op.f("ck_model_energy_hourly_energy_j_non_negative")),
        sa.PrimaryKeyConstraint("model", "hour_at", name=op.f("pk_model_energy_hourly")),
    )
    op.create_index(op.f("ix_model_energy_hourly_hour_at"), "model_energy_hourly", ["hour_at"])
    op.create_table(
        "account_energy_daily",
        sa.Column("account", sa.String(length=255), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("day_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("energy_j", sa.Double(), nullable=False),
        sa.CheckConstraint("energy_j >= 0", name=op.f("ck_account_energy_daily_energy_j_non_negative")),
        sa.PrimaryKeyConstraint("account", "user_name", "day_at", name=op.f("pk_account_energy_daily")),
    )
    op.create_index(op.f("ix_account_energy_daily_day_at"), "account_energy_daily", ["day_at"])
    op.create_table(
        "node_energy_hourly",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("hour_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("day_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("energy_j", sa.Double(), nullable=False),
        sa.Column("idle_energy_j", sa.Double(), nullable=False),
        sa.CheckConstraint("energy_j >= 0", name=op.f("ck_node_energy_hourly_energy_j_non_negative")),
        sa.CheckConstraint("idle_energy_j >= 0", name=op.f("ck_node_energy_hourly_idle_energy_j_non_negative")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_node_energy_hourly_node_id_nodes"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("node_id", "hour_at", name=op.f("pk_node_energy_hourly")),
    )
    op.create_index(op.f("ix_node_energy_hourly_day_at"), "node_energy_hourly", ["day_at"])
    op.create_index(op.f("ix_node_energy_hourly_hour_at"), "node_energy_hourly", ["hour_at"])
    with op.batch_alter_table("energy_sample_shares") as batch:
        batch.drop_constraint("fk_energy_sample_shares_sample", type_="foreignkey")
    # Plain SQL both backends run: each GPU's latest stored reading becomes its cursor.
    op.execute(
        "INSERT INTO energy_cursors (gpu_id, sampled_at, energy_counter_j) "
        "SELECT s.gpu_id, s.sampled_at, s.energy_counter_j FROM energy_samples s "
        "WHERE s.sampled_at = (SELECT MAX(l.sampled_at) FROM energy_samples l WHERE l.gpu_id = s.gpu_id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("energy_sample_shares") as batch:
        batch.create_foreign_key("fk_energy_sample_shares_sample", "energy_samples", ["gpu_id", "sampled_at"],
                                 ["gpu_id", "sampled_at"], ondelete="CASCADE")
    op.drop_table("node_energy_hourly")
    op.drop_table("account_energy_daily")
    op.drop_table("model_energy_hourly")
    op.drop_table("energy_cursors")
