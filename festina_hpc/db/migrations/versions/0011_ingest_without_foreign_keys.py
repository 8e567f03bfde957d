"""Raw energy samples and shares without foreign keys to ``gpus`` and ``model_instances``.

PostgreSQL checks a foreign key with one trigger per inserted row; on the ingest's COPY of samples
and shares those checks were more than half of the database's time (measured: 200,000 samples and
their shares, 3.5 s with the keys, 1.5 s without). The ingest refuses a reading of an unknown GPU
or instance before it writes anything (``festina_hpc.db.ingest.lookup``), and festina never
deletes a GPU or an instance row, so the references hold without the checks (as the share-to-sample
reference has since 0002). Retention deletes old samples and shares by time.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("energy_samples") as batch:
        batch.drop_constraint("fk_energy_samples_gpu_id_gpus", type_="foreignkey")
    with op.batch_alter_table("energy_sample_shares") as batch:
        batch.drop_constraint("fk_energy_sample_shares_instance_id_model_instances", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("energy_sample_shares") as batch:
        batch.create_foreign_key("fk_energy_sample_shares_instance_id_model_instances", "model_instances",
                                 ["instance_id"], ["id"], ondelete="CASCADE")
    with op.batch_alter_table("energy_samples") as batch:
        batch.create_foreign_key("fk_energy_samples_gpu_id_gpus", "gpus", ["gpu_id"], ["id"], ondelete="CASCADE")
