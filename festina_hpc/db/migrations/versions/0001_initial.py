"""Initial schema: cluster state (nodes, GPUs, Slurm jobs, instances), requests, energy, decisions.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "decisions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("instance_id", sa.Integer(), nullable=True),
        sa.Column("gpu_id", sa.Integer(), nullable=True),
        sa.Column("node_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "details", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.CheckConstraint(
            "kind IN ('placement', 'setting', 'migration', 'scale', 'power')", name=op.f("ck_decisions_kind_known")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decisions")),
    )
    op.create_index(op.f("ix_decisions_decided_at"), "decisions", ["decided_at"])
    op.create_index(op.f("ix_decisions_instance_id"), "decisions", ["instance_id"])
    op.create_index(op.f("ix_decisions_kind_decided_at"), "decisions", ["kind", "decided_at"])

    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=64), nullable=False),
        sa.Column("powered", sa.Boolean(), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("gpu_count >= 0", name=op.f("ck_nodes_gpu_count_non_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
        sa.UniqueConstraint("name", name=op.f("uq_nodes_name")),
    )
    op.create_table(
        "slurm_jobs",
        sa.Column("job_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("account", sa.String(length=255), nullable=False),
        sa.Column("partition", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=64), nullable=False),
        sa.Column("node_list", sa.Text(), nullable=False),
        sa.Column("gres", sa.String(length=255), nullable=False),
        sa.Column("submit_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("energy_j", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("energy_j IS NULL OR energy_j >= 0", name=op.f("ck_slurm_jobs_energy_j_non_negative")),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_slurm_jobs")),
    )
    op.create_index(op.f("ix_slurm_jobs_account_start_at"), "slurm_jobs", ["account", "start_at"])
    op.create_index(op.f("ix_slurm_jobs_end_at"), "slurm_jobs", ["end_at"])
    op.create_index(op.f("ix_slurm_jobs_start_at"), "slurm_jobs", ["start_at"])

    op.create_table(
        "gpus",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("gpu_index", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(length=64), nullable=True),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("clock_mhz", sa.Integer(), nullable=True),
        sa.Column("power_w", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("clock_mhz IS NULL OR clock_mhz > 0", name=op.f("ck_gpus_clock_mhz_positive")),
        sa.CheckConstraint("gpu_index >= 0", name=op.f("ck_gpus_gpu_index_non_negative")),
        sa.CheckConstraint("power_w IS NULL OR power_w >= 0", name=op.f("ck_gpus_power_w_non_negative")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_gpus_node_id_nodes"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gpus")),
        sa.UniqueConstraint("node_id", "gpu_index", name=op.f("uq_gpus_node_id_gpu_index")),
        sa.UniqueConstraint("uuid", name=op.f("uq_gpus_uuid")),
    )
    op.create_table(
        "job_energy",
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("energy_j", sa.Double(), nullable=False),
        sa.Column("from_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("to_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("energy_j >= 0", name=op.f("ck_job_energy_energy_j_non_negative")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["slurm_jobs.job_id"], name=op.f("fk_job_energy_job_id_slurm_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_energy")),
    )
    op.create_table(
        "model_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("sm_pct", sa.Double(), nullable=False),
        sa.Column("batch_cap", sa.Integer(), nullable=False),
        sa.Column("memory_fraction", sa.Double(), nullable=False),
        sa.Column("endpoint_url", sa.String(length=1024), nullable=True),
        sa.Column(
            "phase",
            sa.Enum(
                "loading",
                "ready",
                "draining",
                "stopped",
                name="instance_phase",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("slurm_job_id", sa.BigInteger(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("batch_cap > 0", name=op.f("ck_model_instances_batch_cap_positive")),
        sa.CheckConstraint(
            "memory_fraction > 0 AND memory_fraction <= 1", name=op.f("ck_model_instances_memory_fraction_range")
        ),
        sa.CheckConstraint("sm_pct > 0 AND sm_pct <= 100", name=op.f("ck_model_instances_sm_pct_range")),
        sa.ForeignKeyConstraint(
            ["slurm_job_id"],
            ["slurm_jobs.job_id"],
            name=op.f("fk_model_instances_slurm_job_id_slurm_jobs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_instances")),
    )
    op.create_index(op.f("ix_model_instances_model_started_at"), "model_instances", ["model", "started_at"])
    op.create_index(op.f("ix_model_instances_phase"), "model_instances", ["phase"])
    op.create_index(op.f("ix_model_instances_slurm_job_id"), "model_instances", ["slurm_job_id"])

    op.create_table(
        "energy_samples",
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("sampled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("energy_counter_j", sa.Double(), nullable=False),
        sa.Column("power_w", sa.Double(), nullable=True),
        sa.CheckConstraint("energy_counter_j >= 0", name=op.f("ck_energy_samples_energy_counter_j_non_negative")),
        sa.CheckConstraint("power_w IS NULL OR power_w >= 0", name=op.f("ck_energy_samples_power_w_non_negative")),
        sa.ForeignKeyConstraint(
            ["gpu_id"], ["gpus.id"], name=op.f("fk_energy_samples_gpu_id_gpus"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("gpu_id", "sampled_at", name=op.f("pk_energy_samples")),
    )
    op.create_index(op.f("ix_energy_samples_sampled_at"), "energy_samples", ["sampled_at"])

    op.create_table(
        "instance_energy",
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("energy_j", sa.Double(), nullable=False),
        sa.Column("from_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("to_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("energy_j >= 0", name=op.f("ck_instance_energy_energy_j_non_negative")),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["model_instances.id"],
            name=op.f("fk_instance_energy_instance_id_model_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_instance_energy")),
    )
    op.create_table(
        "instance_gpus",
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.CheckConstraint("rank >= 0", name=op.f("ck_instance_gpus_rank_non_negative")),
        sa.ForeignKeyConstraint(
            ["gpu_id"], ["gpus.id"], name=op.f("fk_instance_gpus_gpu_id_gpus"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["model_instances.id"],
            name=op.f("fk_instance_gpus_instance_id_model_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_id", "rank", name=op.f("pk_instance_gpus")),
    )
    op.create_index(op.f("ix_instance_gpus_gpu_id"), "instance_gpus", ["gpu_id"])

    op.create_table(
        "requests",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("external_id", sa.String(length=128), nullable=True),
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
        sa.Column("slo_met", sa.Boolean(), nullable=False),
        sa.CheckConstraint("max_tbt_s IS NULL OR max_tbt_s >= 0", name=op.f("ck_requests_max_tbt_s_non_negative")),
        sa.CheckConstraint("mean_tbt_s IS NULL OR mean_tbt_s >= 0", name=op.f("ck_requests_mean_tbt_s_non_negative")),
        sa.CheckConstraint("prompt_tokens >= 0 AND output_tokens >= 0", name=op.f("ck_requests_tokens_non_negative")),
        sa.CheckConstraint("ttft_s IS NULL OR ttft_s >= 0", name=op.f("ck_requests_ttft_s_non_negative")),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["model_instances.id"],
            name=op.f("fk_requests_instance_id_model_instances"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_requests")),
    )
    op.create_index(op.f("ix_requests_account_arrival_at"), "requests", ["account", "arrival_at"])
    op.create_index(op.f("ix_requests_arrival_at"), "requests", ["arrival_at"])
    op.create_index(op.f("ix_requests_external_id"), "requests", ["external_id"])
    op.create_index(op.f("ix_requests_instance_id"), "requests", ["instance_id"])
    op.create_index(op.f("ix_requests_model_arrival_at"), "requests", ["model", "arrival_at"])

    op.create_table(
        "energy_sample_shares",
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("sampled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("share_frac", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "share_frac >= 0 AND share_frac <= 1", name=op.f("ck_energy_sample_shares_share_frac_range")
        ),
        sa.ForeignKeyConstraint(
            ["gpu_id", "sampled_at"],
            ["energy_samples.gpu_id", "energy_samples.sampled_at"],
            name="fk_energy_sample_shares_sample",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["model_instances.id"],
            name=op.f("fk_energy_sample_shares_instance_id_model_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("gpu_id", "sampled_at", "instance_id", name=op.f("pk_energy_sample_shares")),
    )
    op.create_index(op.f("ix_energy_sample_shares_instance_id"), "energy_sample_shares", ["instance_id"])


def downgrade() -> None:
    # Dependents first; dropping a table drops its indexes.
    op.drop_table("energy_sample_shares")
    op.drop_table("requests")
    op.drop_table("instance_gpus")
    op.drop_table("instance_energy")
    op.drop_table("energy_samples")
    op.drop_table("model_instances")
    op.drop_table("job_energy")
    op.drop_table("gpus")
    op.drop_table("slurm_jobs")
    op.drop_table("nodes")
    op.drop_table("decisions")
