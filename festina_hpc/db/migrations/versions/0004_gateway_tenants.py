"""Gateway tenants: issued API keys, each request's key, and the rollups that split instance energy by tenant.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

``instance_energy_hourly`` and ``tenant_tokens_hourly`` start empty: energy and requests recorded
before this revision are not split by tenant (the job-owner rollups still hold them).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("account", sa.String(length=255), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("rate_limit_per_s", sa.Double(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("rate_limit_per_s IS NULL OR rate_limit_per_s > 0",
                           name=op.f("ck_api_keys_rate_limit_per_s_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_account"), "api_keys", ["account"])
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("api_key_id", sa.Integer(), nullable=True))
    op.create_table(
        "instance_energy_hourly",
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("hour_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("energy_j", sa.Double(), nullable=False),
        sa.CheckConstraint("energy_j >= 0", name=op.f("ck_instance_energy_hourly_energy_j_non_negative")),
        sa.ForeignKeyConstraint(["instance_id"], ["model_instances.id"],
                                name=op.f("fk_instance_energy_hourly_instance_id_model_instances"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("instance_id", "hour_at", name=op.f("pk_instance_energy_hourly")),
    )
    op.create_index(op.f("ix_instance_energy_hourly_hour_at"), "instance_energy_hourly", ["hour_at"])
    op.create_table(
        "tenant_tokens_hourly",
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=255), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("hour_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.CheckConstraint("tokens >= 0", name=op.f("ck_tenant_tokens_hourly_tokens_non_negative")),
        sa.CheckConstraint("requests >= 0", name=op.f("ck_tenant_tokens_hourly_requests_non_negative")),
        sa.ForeignKeyConstraint(["instance_id"], ["model_instances.id"],
                                name=op.f("fk_tenant_tokens_hourly_instance_id_model_instances"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("instance_id", "account", "user_name", "hour_at",
                                name=op.f("pk_tenant_tokens_hourly")),
    )
    op.create_index(op.f("ix_tenant_tokens_hourly_hour_at"), "tenant_tokens_hourly", ["hour_at"])


def downgrade() -> None:
    op.drop_table("tenant_tokens_hourly")
    op.drop_table("instance_energy_hourly")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("api_key_id")
    op.drop_table("api_keys")
