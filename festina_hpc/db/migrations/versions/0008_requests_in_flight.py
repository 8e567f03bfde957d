"""Checkpoints of requests in flight, so a festinad crash (SIGKILL) still leaves their tokens to charge.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

The gateway writes each request still running at a flush to ``requests_in_flight`` (tokens so far);
its final ``requests`` row replaces it, and festinad moves rows left there by a crash into
``requests`` (outcome ``gateway_crashed``) when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "requests_in_flight",
        sa.Column("external_id", sa.String(length=128), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=True),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("account", sa.String(length=255), nullable=False),
        sa.Column("arrival_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_token_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finish_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("ttft_s", sa.Double(), nullable=True),
        sa.Column("mean_tbt_s", sa.Double(), nullable=True),
        sa.Column("max_tbt_s", sa.Double(), nullable=True),
        sa.CheckConstraint("prompt_tokens >= 0 AND output_tokens >= 0",
                           name=op.f("ck_requests_in_flight_tokens_non_negative")),
        sa.ForeignKeyConstraint(["instance_id"], ["model_instances.id"],
                                name=op.f("fk_requests_in_flight_instance_id_model_instances"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("external_id", name=op.f("pk_requests_in_flight")),
    )


def downgrade() -> None:
    op.drop_table("requests_in_flight")
