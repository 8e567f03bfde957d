"""The catalogue's output limit: the largest ``max_tokens`` a request for the model may ask.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Existing entries get NULL: their limit stays the profile's context length, as before this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("catalogue_models") as batch:
        batch.add_column(sa.Column("max_output_tokens", sa.Integer(), nullable=True))
        batch.create_check_constraint(op.f("ck_catalogue_models_max_output_tokens_positive"),
                                      "max_output_tokens IS NULL OR max_output_tokens > 0")


def downgrade() -> None:
    with op.batch_alter_table("catalogue_models") as batch:
        batch.drop_constraint(op.f("ck_catalogue_models_max_output_tokens_positive"), type_="check")
        batch.drop_column("max_output_tokens")
