"""The database schema: cluster state the daemon rebuilds itself from, per-request outcomes, energy, decisions.

Three groups of tables:

- live state, updated in place: ``nodes``, ``gpus``, ``slurm_jobs``, ``model_instances``
  (and ``instance_gpus``, an instance's placement, one row per tensor-parallel rank);
- append-only records, written in batches: ``requests``, ``energy_samples`` (with
  ``energy_sample_shares``, an optional split of a sample over the GPU's instances) and
  ``decisions`` (the audit trail of what the policy decided and why);
- the model catalogue, ``catalogue_models``: what festinad serves, on which profile, with which SLOs
  (managed by ``festina models``);
- the gateway's tenants, ``api_keys``: one row per issued key, its hash only (``festina keys``);
- totals and rollups, maintained at ingest: ``job_energy``, ``instance_energy``, ``energy_cursors``,
  ``model_energy_hourly``, ``account_energy_daily``, ``node_energy_hourly``, and the two that split
  an instance's energy over the tenants it served, ``instance_energy_hourly`` and ``tenant_tokens_hourly``.

The integer ids of ``nodes``, ``gpus`` and ``model_instances`` are the ids the daemon hands
the policy (``NodeView.id``, ``GpuView.id``, ``InstanceView.id``), so a decision names rows
directly and the ids survive a restart. Every timestamp is a timezone-aware UTC
``UtcDateTime``; every quantity carries its unit in the column name. Columns whose
values have a physical range carry a CHECK as well as the store's validation, so a
writer that bypasses the store cannot store a negative energy either.

The migrations in ``festina_hpc/db/migrations`` must build exactly this schema; a test
compares the two after ``upgrade head``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from festina_hpc.db.types import UtcDateTime
from festina_hpc.policy.types import InstancePhase

# Constraint names that are the same on every backend, so a later migration can drop or
# alter a constraint by name (SQLite's batch mode needs names to recreate tables).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# An id column that is BIGINT on PostgreSQL but INTEGER on SQLite, where only
# "INTEGER PRIMARY KEY" is the auto-incrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Decision kinds of the audit trail (see store.decision_rows for which action is which).
DECISION_KINDS = ("placement", "setting", "migration", "scale", "power")


def _phase_values(enum: type[InstancePhase]) -> list[str]:
    return [member.name.lower() for member in enum]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSON().with_variant(JSONB(), "postgresql")}


class Node(Base):
    """A Slurm node with GPUs, as the daemon last saw it."""

    __tablename__ = "nodes"
    __table_args__ = (CheckConstraint("gpu_count >= 0", name="gpu_count_non_negative"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)  # Slurm's NodeName
    state: Mapped[str] = mapped_column(String(64))  # Slurm's state, e.g. "idle", "mixed", "down+drain"
    powered: Mapped[bool] = mapped_column(Boolean)  # False while Slurm's power saving holds it off
    gpu_count: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]

    gpus: Mapped[list[Gpu]] = relationship(back_populates="node", order_by="Gpu.gpu_index")


class Gpu(Base):
    """One GPU of a node, with the settings and power last read from it."""

    __tablename__ = "gpus"
    __table_args__ = (
        UniqueConstraint("node_id", "gpu_index"),
        CheckConstraint("gpu_index >= 0", name="gpu_index_non_negative"),
        CheckConstraint("clock_mhz IS NULL OR clock_mhz > 0", name="clock_mhz_positive"),
        CheckConstraint("power_w IS NULL OR power_w >= 0", name="power_w_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    gpu_index: Mapped[int] = mapped_column(Integer)  # NVML index on its node
    uuid: Mapped[str | None] = mapped_column(String(64), unique=True)
    gpu_type: Mapped[str] = mapped_column(String(64))  # a profile GPU name, e.g. "h100-sxm-80gb"
    clock_mhz: Mapped[int | None] = mapped_column(Integer)  # locked SM clock; None = driver default
    power_w: Mapped[float | None] = mapped_column(Double)  # board power at updated_at
    updated_at: Mapped[datetime]

    node: Mapped[Node] = relationship(back_populates="gpus")


class SlurmJob(Base):
    """A Slurm job festina knows of: a serving job (one per model instance) or any job it accounts."""

    __tablename__ = "slurm_jobs"
    __table_args__ = (
        CheckConstraint("energy_j IS NULL OR energy_j >= 0", name="energy_j_non_negative"),
        Index(None, "start_at"),
        Index(None, "end_at"),
        Index(None, "account", "start_at"),
    )

    job_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(255), default="")
    user_name: Mapped[str] = mapped_column(String(255), default="")
    account: Mapped[str] = mapped_column(String(255), default="")
    partition: Mapped[str] = mapped_column(String(255), default="")
    state: Mapped[str] = mapped_column(String(64))  # Slurm's, e.g. "PENDING", "RUNNING", "COMPLETED"
    node_list: Mapped[str] = mapped_column(Text, default="")  # Slurm's hostlist expression, e.g. "gpu[01-02]"
    gres: Mapped[str] = mapped_column(String(255), default="")  # e.g. "gpu:h100:1" or "mps:50"
    submit_at: Mapped[datetime | None]
    start_at: Mapped[datetime | None]
    end_at: Mapped[datetime | None]
    # Energy as Slurm accounts it (sacct ConsumedEnergy); None where Slurm has none, which is
    # the case for GPUs (its NVML energy plugin is a stub). festina's own total is job_energy.
    energy_j: Mapped[float | None] = mapped_column(Double)
    # Slurm's ExitCode=<exit_code>:<exit_signal> of the batch script; None until festinad saw the job end.
    exit_code: Mapped[int | None]
    exit_signal: Mapped[int | None]
    updated_at: Mapped[datetime]


class ModelInstance(Base):
    """A model instance: one serving process (one Slurm job) on one or more GPUs of a node."""

    __tablename__ = "model_instances"
    __table_args__ = (
        CheckConstraint("sm_pct > 0 AND sm_pct <= 100", name="sm_pct_range"),
        CheckConstraint("batch_cap > 0", name="batch_cap_positive"),
        CheckConstraint("memory_fraction > 0 AND memory_fraction <= 1", name="memory_fraction_range"),
        Index(None, "phase"),
        Index(None, "model", "started_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(255))
    sm_pct: Mapped[float] = mapped_column(Double)  # MPS share of each of its GPUs
    batch_cap: Mapped[int] = mapped_column(Integer)  # max sequences in a batch
    memory_fraction: Mapped[float] = mapped_column(Double)  # of each GPU's usable memory
    endpoint_url: Mapped[str | None] = mapped_column(String(1024))  # None until the server listens
    phase: Mapped[InstancePhase] = mapped_column(
        Enum(InstancePhase, name="instance_phase", native_enum=False, create_constraint=True, length=16,
             values_callable=_phase_values, validate_strings=True))
    slurm_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("slurm_jobs.job_id", ondelete="SET NULL"), index=True)
    started_at: Mapped[datetime]  # when festina started it (the job submitted)
    ready_at: Mapped[datetime | None]  # when it first served
    stopped_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    placement: Mapped[list[InstanceGpu]] = relationship(order_by="InstanceGpu.rank",
                                                        cascade="all, delete-orphan")
    job: Mapped[SlurmJob | None] = relationship()


class InstanceGpu(Base):
    """An instance's GPU for one tensor-parallel rank."""

    __tablename__ = "instance_gpus"
    __table_args__ = (CheckConstraint("rank >= 0", name="rank_non_negative"),)

    instance_id: Mapped[int] = mapped_column(ForeignKey("model_instances.id", ondelete="CASCADE"),
                                             primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # RESTRICT: a GPU that ever held an instance keeps its history; retire nodes, don't delete them.
    gpu_id: Mapped[int] = mapped_column(ForeignKey("gpus.id", ondelete="RESTRICT"), index=True)


class RequestRecord(Base):
    """One finished (or dropped) inference request and how it met its SLOs."""

    __tablename__ = "requests"
    __table_args__ = (
        CheckConstraint("prompt_tokens >= 0 AND output_tokens >= 0", name="tokens_non_negative"),
        CheckConstraint("ttft_s IS NULL OR ttft_s >= 0", name="ttft_s_non_negative"),
        CheckConstraint("mean_tbt_s IS NULL OR mean_tbt_s >= 0", name="mean_tbt_s_non_negative"),
        CheckConstraint("max_tbt_s IS NULL OR max_tbt_s >= 0", name="max_tbt_s_non_negative"),
        Index(None, "arrival_at"),
        Index(None, "model", "arrival_at"),
        Index(None, "account", "arrival_at"),
        Index(None, "instance_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(128), index=True)  # the gateway's request id
    # The key it came with (None: an open gateway's keyless request, or not from the gateway). No
    # foreign key: keys are revoked, never deleted, and a request row outlives any cleanup of them.
    api_key_id: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(255))
    # None for a request that was dropped before it reached an instance.
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("model_instances.id", ondelete="SET NULL"))
    user_name: Mapped[str] = mapped_column(String(255), default="")
    account: Mapped[str] = mapped_column(String(255), default="")
    arrival_at: Mapped[datetime]
    first_token_at: Mapped[datetime | None]
    finish_at: Mapped[datetime | None]
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    ttft_s: Mapped[float | None] = mapped_column(Double)
    mean_tbt_s: Mapped[float | None] = mapped_column(Double)
    max_tbt_s: Mapped[float | None] = mapped_column(Double)
    slo_met: Mapped[bool] = mapped_column(Boolean)
    # How it ended, the gateway's Outcome: ok, no_instance, upstream_error, client_gone, gateway_stopped,
    # gateway_crashed (the last checkpoint of a request festinad's crash cut: see RequestInFlight)
    # (None: recorded before revision 0007, or by a writer that does not say).
    outcome: Mapped[str | None] = mapped_column(String(32))


class RequestInFlight(Base):
    """The last checkpoint of a request festinad is still answering (the gateway's ``in_flight``, every flush).

    Its final ``requests`` row replaces it. Rows left here when festinad starts were cut by a crash: they
    become ``requests`` rows with outcome ``gateway_crashed`` and the tokens of their last checkpoint."""

    __tablename__ = "requests_in_flight"
    __table_args__ = (CheckConstraint("prompt_tokens >= 0 AND output_tokens >= 0", name="tokens_non_negative"),)

    external_id: Mapped[str] = mapped_column(String(128), primary_key=True)  # the gateway's request id
    api_key_id: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(255))
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("model_instances.id", ondelete="SET NULL"))
    user_name: Mapped[str] = mapped_column(String(255), default="")
    account: Mapped[str] = mapped_column(String(255), default="")
    arrival_at: Mapped[datetime]
    first_token_at: Mapped[datetime | None]
    finish_at: Mapped[datetime | None]  # the checkpoint's time
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    ttft_s: Mapped[float | None] = mapped_column(Double)
    mean_tbt_s: Mapped[float | None] = mapped_column(Double)
    max_tbt_s: Mapped[float | None] = mapped_column(Double)


class EnergySample(Base):
    """A reading of a GPU's energy counter and power; accounting differences consecutive readings."""

    __tablename__ = "energy_samples"
    __table_args__ = (
        CheckConstraint("energy_counter_j >= 0", name="energy_counter_j_non_negative"),
        CheckConstraint("power_w IS NULL OR power_w >= 0", name="power_w_non_negative"),
        Index(None, "sampled_at"),
    )

    # The GPU and the time identify a reading: re-recording one is a no-op, not a duplicate.
    # No foreign key to gpus (migration 0011): PostgreSQL's per-row check was more than half of the
    # ingest's COPY; the ingest refuses an unknown GPU before writing, and GPU rows are never deleted.
    gpu_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sampled_at: Mapped[datetime] = mapped_column(primary_key=True)
    # NVML's cumulative counter since an arbitrary origin (it restarts with the driver).
    energy_counter_j: Mapped[float] = mapped_column(Double)
    power_w: Mapped[float | None] = mapped_column(Double)


class EnergySampleShare(Base):
    """The fraction of a sample's GPU energy attributed to one of the GPU's instances (optional)."""

    __tablename__ = "energy_sample_shares"
    # No foreign key to energy_samples (migration 0002 dropped it): the ingest writes a sample and
    # its shares together in one transaction, so the reference holds by construction, and checking
    # it row by row cost PostgreSQL more than half of the ingest time. Retention deletes shares
    # with their samples (festina_hpc/db/retention.py). Nor to model_instances (0011), for the same
    # cost: the ingest refuses an unknown instance before writing, and instance rows are never deleted.
    __table_args__ = (
        CheckConstraint("share_frac >= 0 AND share_frac <= 1", name="share_frac_range"),
        Index(None, "instance_id"),
    )

    gpu_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sampled_at: Mapped[datetime] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    share_frac: Mapped[float] = mapped_column(Double)


class JobEnergy(Base):
    """festina's measured energy total of a Slurm job over [from_at, to_at]."""

    __tablename__ = "job_energy"
    __table_args__ = (CheckConstraint("energy_j >= 0", name="energy_j_non_negative"),)

    job_id: Mapped[int] = mapped_column(ForeignKey("slurm_jobs.job_id", ondelete="CASCADE"), primary_key=True)
    energy_j: Mapped[float] = mapped_column(Double)
    from_at: Mapped[datetime]
    to_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class InstanceEnergy(Base):
    """festina's measured energy total of a model instance over [from_at, to_at]."""

    __tablename__ = "instance_energy"
    __table_args__ = (CheckConstraint("energy_j >= 0", name="energy_j_non_negative"),)

    instance_id: Mapped[int] = mapped_column(ForeignKey("model_instances.id", ondelete="CASCADE"),
                                             primary_key=True)
    energy_j: Mapped[float] = mapped_column(Double)
    from_at: Mapped[datetime]
    to_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Decision(Base):
    """One action the policy decided, with its reason: the audit trail.

    The ids are plain integers, not foreign keys: an audit row outlives the rows it names
    and may name one that does not exist yet (a started instance has no id when decided).
    A decision made again unchanged (a policy re-deciding every period) is not a new row: the
    latest row for its target counts it (``times_decided``, ``last_decided_at``; see
    ``Store._record_decisions``).
    """

    __tablename__ = "decisions"
    __table_args__ = (
        CheckConstraint("kind IN ('placement', 'setting', 'migration', 'scale', 'power')", name="kind_known"),
        CheckConstraint("times_decided >= 1", name="times_decided_positive"),
        Index(None, "decided_at"),
        Index(None, "kind", "decided_at"),
        Index(None, "instance_id"),
        Index(None, "last_decided_at"),
        Index(None, "kind", "node_id", "gpu_id"),  # the latest decision for a target, looked up at each record
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    decided_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))  # e.g. "start_instance", "power_off", "gpu_settings"
    model: Mapped[str | None] = mapped_column(String(255))
    instance_id: Mapped[int | None] = mapped_column(Integer)
    gpu_id: Mapped[int | None] = mapped_column(Integer)  # the first GPU where an action names several
    node_id: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]]  # the action's fields as JSON
    times_decided: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # 1: decided once
    last_decided_at: Mapped[datetime]  # when it was last decided again (decided_at if only once)


class CatalogueModel(Base):
    """A served model in the catalogue: its profile, engine, SLOs and scaling bounds (``festina models``)."""

    __tablename__ = "catalogue_models"
    __table_args__ = (
        UniqueConstraint("profile", "gpu_type"),
        CheckConstraint("engine IN ('vllm', 'emulated')", name="engine_known"),
        CheckConstraint("ttft_slo_s > 0", name="ttft_slo_s_positive"),
        CheckConstraint("tbt_slo_s > 0", name="tbt_slo_s_positive"),
        CheckConstraint("min_instances >= 0", name="min_instances_non_negative"),
        CheckConstraint("max_instances IS NULL OR max_instances >= min_instances", name="max_instances_range"),
        CheckConstraint("keep_alive_s IS NULL OR keep_alive_s >= 0", name="keep_alive_s_non_negative"),
        CheckConstraint("max_output_tokens IS NULL OR max_output_tokens > 0", name="max_output_tokens_positive"),
    )

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # the name clients send
    profile: Mapped[str] = mapped_column(String(255))  # a profile model name, canonical
    gpu_type: Mapped[str] = mapped_column(String(64))  # a profile GPU name, canonical
    engine: Mapped[str] = mapped_column(String(16))  # "vllm" or "emulated"
    engine_args: Mapped[str] = mapped_column(Text, default="")  # extra engine arguments, shell words
    ttft_slo_s: Mapped[float] = mapped_column(Double)
    tbt_slo_s: Mapped[float] = mapped_column(Double)
    min_instances: Mapped[int] = mapped_column(Integer, default=0)
    max_instances: Mapped[int | None] = mapped_column(Integer)  # None: no bound
    keep_alive_s: Mapped[float | None] = mapped_column(Double)  # None: festinad's default
    account: Mapped[str] = mapped_column(String(255), default="")  # Slurm account of its serving jobs
    max_output_tokens: Mapped[int | None] = mapped_column(Integer)  # None: the profile's context length
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class ApiKey(Base):
    """A gateway key issued to a user and Slurm account (``festina keys``); the token itself is never stored."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("rate_limit_per_s IS NULL OR rate_limit_per_s > 0", name="rate_limit_per_s_positive"),
        CheckConstraint("role IN ('user', 'admin')", name="role_known"),
        Index(None, "account"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the token, hex
    prefix: Mapped[str] = mapped_column(String(16))  # the token's first characters, to recognise it in a list
    user_name: Mapped[str] = mapped_column(String(255))
    account: Mapped[str] = mapped_column(String(255))
    models: Mapped[str] = mapped_column(Text, default="")  # comma-separated canonical names; "" = every model
    rate_limit_per_s: Mapped[float | None] = mapped_column(Double)  # None: no limit
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]  # None: never
    revoked_at: Mapped[datetime | None]
    # "user": the gateway's /v1/*; "admin": also festinad's /admin/* (festina_hpc/daemon/admin_api.py)
    role: Mapped[str] = mapped_column(String(16), default="user", server_default="user")


# -- rollups, maintained at ingest (festina_hpc/db/ingest.py) in the transaction of each batch ----------------
#
# Energy over a span is the difference of two readings of one GPU's counter; a rollup row adds up
# those differences, each counted in the bucket of the reading that closes it. Reports read these
# (a few rows per model, node or account per hour) instead of the raw samples, which retention
# may prune; job_energy and instance_energy above are the per-job and per-instance rollups.


class EnergyCursor(Base):
    """The last reading ingested of each GPU: where the next reading's energy difference starts.

    It outlives pruned raw samples, so retention never turns the next difference into a gap.
    """

    __tablename__ = "energy_cursors"
    __table_args__ = (CheckConstraint("energy_counter_j >= 0", name="energy_counter_j_non_negative"),)

    gpu_id: Mapped[int] = mapped_column(ForeignKey("gpus.id", ondelete="CASCADE"), primary_key=True)
    sampled_at: Mapped[datetime]
    energy_counter_j: Mapped[float] = mapped_column(Double)


class ModelEnergyHourly(Base):
    """GPU energy attributed to a model (through its instances' shares) per UTC hour."""

    __tablename__ = "model_energy_hourly"
    __table_args__ = (CheckConstraint("energy_j >= 0", name="energy_j_non_negative"), Index(None, "hour_at"))

    model: Mapped[str] = mapped_column(String(255), primary_key=True)
    hour_at: Mapped[datetime] = mapped_column(primary_key=True)  # the hour's start
    energy_j: Mapped[float] = mapped_column(Double)


class AccountEnergyDaily(Base):
    """GPU energy attributed to a Slurm account and user per UTC day ("" where an instance has no job)."""

    __tablename__ = "account_energy_daily"
    __table_args__ = (CheckConstraint("energy_j >= 0", name="energy_j_non_negative"), Index(None, "day_at"))

    account: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    day_at: Mapped[datetime] = mapped_column(primary_key=True)  # the day's start (00:00 UTC)
    energy_j: Mapped[float] = mapped_column(Double)


class NodeEnergyHourly(Base):
    """All GPU energy of a node per UTC hour, and the part no instance's share claimed (idle energy)."""

    __tablename__ = "node_energy_hourly"
    __table_args__ = (
        CheckConstraint("energy_j >= 0", name="energy_j_non_negative"),
        CheckConstraint("idle_energy_j >= 0", name="idle_energy_j_non_negative"),
        Index(None, "hour_at"),
        Index(None, "day_at"),
    )

    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    hour_at: Mapped[datetime] = mapped_column(primary_key=True)
    # The hour's day, stored so that per-day reports group by a column on SQLite and PostgreSQL alike
    # (the two have no common date-truncation function).
    day_at: Mapped[datetime]
    energy_j: Mapped[float] = mapped_column(Double)
    idle_energy_j: Mapped[float] = mapped_column(Double)


class InstanceEnergyHourly(Base):
    """GPU energy attributed to a model instance (its shares) per UTC hour: what its tenants split."""

    __tablename__ = "instance_energy_hourly"
    __table_args__ = (CheckConstraint("energy_j >= 0", name="energy_j_non_negative"), Index(None, "hour_at"))

    instance_id: Mapped[int] = mapped_column(ForeignKey("model_instances.id", ondelete="CASCADE"),
                                             primary_key=True)
    hour_at: Mapped[datetime] = mapped_column(primary_key=True)
    energy_j: Mapped[float] = mapped_column(Double)


class TenantTokensHourly(Base):
    """Tokens (prompt + output) an instance processed per tenant (account, user) per UTC hour of arrival.

    Maintained as request records are written (``Store.record_requests``); the tenant report
    splits ``instance_energy_hourly`` by these (``db/queries/energy_by_tenant.sql``).
    """

    __tablename__ = "tenant_tokens_hourly"
    __table_args__ = (
        CheckConstraint("tokens >= 0", name="tokens_non_negative"),
        CheckConstraint("requests >= 0", name="requests_non_negative"),
        Index(None, "hour_at"),
    )

    instance_id: Mapped[int] = mapped_column(ForeignKey("model_instances.id", ondelete="CASCADE"),
                                             primary_key=True)
    account: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    hour_at: Mapped[datetime] = mapped_column(primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(Integer)
