"""The model catalogue: served models with their profile, engine, SLOs and scaling bounds.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "catalogue_models",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("profile", sa.String(length=255), nullable=False),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("engine", sa.String(length=16), nullable=False),
        sa.Column("engine_args", sa.Text(), nullable=False),
        sa.Column("ttft_slo_s", sa.Double(), nullable=False),
        sa.Column("tbt_slo_s", sa.Double(), nullable=False),
        sa.Column("min_instances", sa.Integer(), nullable=False),
        sa.Column("max_instances", sa.Integer(), nullable=True),
        sa.Column("keep_alive_s", sa.Double(), nullable=True),
        sa.Column("account", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("engine IN ('vllm', 'emulated')", name=op.f("ck_catalogue_models_engine_known")),
        sa.CheckConstraint("ttft_slo_s > 0", name=op.f("ck_catalogue_models_ttft_slo_s_positive")),
        sa.CheckConstraint("tbt_slo_s > 0", name=op.f("ck_catalogue_models_tbt_slo_s_positive")),
        sa.CheckConstraint("min_instances >= 0", name=op.f("ck_catalogue_models_min_instances_non_negative")),
        sa.CheckConstraint("max_instances IS NULL OR max_instances >= min_instances",
                           name=op.f("ck_catalogue_models_max_instances_range")),
        sa.CheckConstraint("keep_alive_s IS NULL OR keep_alive_s >= 0",
                           name=op.f("ck_catalogue_models_keep_alive_s_non_negative")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_catalogue_models")),
        sa.UniqueConstraint("profile", "gpu_type", name=op.f("uq_catalogue_models_profile_gpu_type")),
    )


def downgrade() -> None:
    op.drop_table("catalogue_models")
