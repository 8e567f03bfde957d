"""Roles on API keys: "user" (the gateway's /v1/*) or "admin" (also festinad's /admin/*).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

Keys issued before this revision become "user" keys: nobody gains the admin API by the upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("role", sa.String(length=16), server_default="user", nullable=False))
        batch.create_check_constraint(op.f("ck_api_keys_role_known"), "role IN ('user', 'admin')")


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("ck_api_keys_role_known"), type_="check")
        batch.drop_column("role")
