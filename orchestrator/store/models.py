"""The SQL schema as typed SQLAlchemy 2 models; `alembic/versions/` must create exactly this.

Tables are prefixed `lf_` so lorafleet can share a database (and its Alembic history, in its own
`lf_alembic_version` table) with MLflow's tables. Types are portable between SQLite and PostgreSQL: JSON
is `sqlalchemy.JSON`, times are `DateTime(timezone=True)` written in UTC (SQLite drops the zone;
`records.py` puts it back). Every value, timestamps included, is set from Python, never by a server
default, so both backends hold the same thing. Constraint names come from one naming convention, which
Alembic's batch mode on SQLite needs to alter a table later.

Rows know how to become immutable records (`to_entity()`); nothing outside the store sees a row.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from orchestrator.store import records as r
from workers.contract.plan import DataConfig, LoraConfig, TrainConfig

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Id = String(32)
Name = String(200)
State = String(32)
Time = DateTime(timezone=True)
# SQLite autoincrements only a column declared exactly INTEGER PRIMARY KEY
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ProjectRow(Base):
    __tablename__ = "lf_projects"

    name: Mapped[str] = mapped_column(Name, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(Time)


class SequenceRow(Base):
    """Named counters: adapter FIFO order (bumped with an UPDATE, which locks the row on PostgreSQL) and
    `cursor:<name>` positions of projections such as the MLflow mirror."""

    __tablename__ = "lf_sequences"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class JobRow(Base):
    __tablename__ = "lf_jobs"
    __table_args__ = (
        Index(None, "project", "created_at"),
        Index(None, "state"),
        UniqueConstraint("project", "idempotency_key"),  # a key is its project's; others never meet it
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True)
    project: Mapped[str] = mapped_column(ForeignKey("lf_projects.name"))
    name: Mapped[str] = mapped_column(Name)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(State)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Time)
    updated_at: Mapped[datetime] = mapped_column(Time)
    kind: Mapped[str] = mapped_column(String(16))  # `JobKind`: train, or session
    end_reason: Mapped[str | None] = mapped_column(Text)  # why a session ended

    def to_entity(self) -> r.JobRecord:
        return r.JobRecord(
            id=self.id,
            project=self.project,
            name=self.name,
            spec=self.spec,
            state=self.state,
            idempotency_key=self.idempotency_key,
            error=self.error,
            mlflow_run_id=self.mlflow_run_id,
            created_at=r.utc(self.created_at),
            updated_at=r.utc(self.updated_at),
            kind=self.kind,  # type: ignore[arg-type]
            end_reason=self.end_reason,
        )


class AdapterRow(Base):
    __tablename__ = "lf_adapters"
    __table_args__ = (
        UniqueConstraint("project", "name"),
        UniqueConstraint("seq"),
        Index(None, "job_id"),
        Index(None, "state", "priority", "seq"),
        Index(None, "parent_id"),
        Index(None, "root_id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True)
    project: Mapped[str] = mapped_column(ForeignKey("lf_projects.name"))
    name: Mapped[str] = mapped_column(Name)
    job_id: Mapped[str] = mapped_column(ForeignKey("lf_jobs.id"))
    state: Mapped[str] = mapped_column(State)
    priority: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger)
    base_model: Mapped[str] = mapped_column(Text)
    quantization: Mapped[str] = mapped_column(String(16))
    dtype: Mapped[str] = mapped_column(String(16))
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    train: Mapped[dict[str, Any]] = mapped_column(JSON)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    # lineage
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("lf_adapters.id"))
    root_id: Mapped[str] = mapped_column(Id)
    depth: Mapped[int] = mapped_column(Integer)
    parent_checkpoint: Mapped[str | None] = mapped_column(Text)
    data_fingerprint: Mapped[str | None] = mapped_column(String(128))
    config_hash: Mapped[str] = mapped_column(String(64))
    # progress and outcome
    output_dir: Mapped[str | None] = mapped_column(Text)
    final_checkpoint: Mapped[str | None] = mapped_column(Text)
    step: Mapped[int] = mapped_column(Integer)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Time)
    updated_at: Mapped[datetime] = mapped_column(Time)
    started_at: Mapped[datetime | None] = mapped_column(Time)
    finished_at: Mapped[datetime | None] = mapped_column(Time)
    # why a queued adapter waits (the controller's words); None once it leaves the queue
    waiting: Mapped[str | None] = mapped_column(Text)

    def to_entity(self) -> r.AdapterRecord:
        return r.AdapterRecord(
            id=self.id,
            project=self.project,
            name=self.name,
            job_id=self.job_id,
            state=self.state,
            priority=self.priority,
            seq=self.seq,
            base_model=self.base_model,
            quantization=self.quantization,
            dtype=self.dtype,
            lora=LoraConfig.model_validate(self.lora),
            train=TrainConfig.model_validate(self.train),
            data=DataConfig.model_validate(self.data),
            parent_id=self.parent_id,
            root_id=self.root_id,
            depth=self.depth,
            parent_checkpoint=self.parent_checkpoint,
            data_fingerprint=self.data_fingerprint,
            config_hash=self.config_hash,
            output_dir=self.output_dir,
            final_checkpoint=self.final_checkpoint,
            step=self.step,
            eval_loss=self.eval_loss,
            error=self.error,
            mlflow_run_id=self.mlflow_run_id,
            created_at=r.utc(self.created_at),
            updated_at=r.utc(self.updated_at),
            started_at=r.utc_or_none(self.started_at),
            finished_at=r.utc_or_none(self.finished_at),
            waiting=self.waiting,
        )


class PackRow(Base):
    __tablename__ = "lf_packs"
    __table_args__ = (Index(None, "state"),)

    id: Mapped[str] = mapped_column(Id, primary_key=True)
    base_model: Mapped[str] = mapped_column(Text)
    quantization: Mapped[str] = mapped_column(String(16))
    dtype: Mapped[str] = mapped_column(String(16))
    resources: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(State)
    ray_run_name: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Time)
    finished_at: Mapped[datetime | None] = mapped_column(Time)

    def to_entity(self) -> r.PackRecord:
        return r.PackRecord(
            id=self.id,
            base_model=self.base_model,
            quantization=self.quantization,
            dtype=self.dtype,
            resources=self.resources,
            state=self.state,
            ray_run_name=self.ray_run_name,
            error=self.error,
            created_at=r.utc(self.created_at),
            finished_at=r.utc_or_none(self.finished_at),
        )


class PackMemberRow(Base):
    """One attempt: an adapter's stay in one pack. `attempt` counts the adapter's stays, from 1."""

    __tablename__ = "lf_pack_members"
    __table_args__ = (UniqueConstraint("adapter_id", "attempt"), Index(None, "pack_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    pack_id: Mapped[str] = mapped_column(ForeignKey("lf_packs.id"))
    adapter_id: Mapped[str] = mapped_column(ForeignKey("lf_adapters.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    joined_at: Mapped[datetime] = mapped_column(Time)
    left_at: Mapped[datetime | None] = mapped_column(Time)
    outcome: Mapped[str | None] = mapped_column(State)

    def to_entity(self) -> r.PackMemberRecord:
        return r.PackMemberRecord(
            pack_id=self.pack_id,
            adapter_id=self.adapter_id,
            attempt=self.attempt,
            joined_at=r.utc(self.joined_at),
            left_at=r.utc_or_none(self.left_at),
            outcome=self.outcome,
        )


class CheckpointRow(Base):
    __tablename__ = "lf_checkpoints"
    __table_args__ = (Index(None, "adapter_id", "step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    adapter_id: Mapped[str] = mapped_column(ForeignKey("lf_adapters.id"))
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    final: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(Time)

    def to_entity(self) -> r.CheckpointRecord:
        return r.CheckpointRecord(
            id=self.id,
            adapter_id=self.adapter_id,
            step=self.step,
            path=self.path,
            final=self.final,
            created_at=r.utc(self.created_at),
        )


class MetricSummaryRow(Base):
    __tablename__ = "lf_metric_summaries"

    adapter_id: Mapped[str] = mapped_column(ForeignKey("lf_adapters.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    last_value: Mapped[float] = mapped_column(Float)
    best_value: Mapped[float] = mapped_column(Float)
    step: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(Time)

    def to_entity(self) -> r.MetricRecord:
        return r.MetricRecord(
            adapter_id=self.adapter_id,
            key=self.key,
            last_value=self.last_value,
            best_value=self.best_value,
            step=self.step,
            updated_at=r.utc(self.updated_at),
        )


class RegistryEntryRow(Base):
    __tablename__ = "lf_registry_entries"
    __table_args__ = (Index(None, "adapter_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    adapter_id: Mapped[str] = mapped_column(ForeignKey("lf_adapters.id"))
    decision: Mapped[str] = mapped_column(State)
    model_name: Mapped[str | None] = mapped_column(String(200))
    version: Mapped[int | None] = mapped_column(Integer)
    alias: Mapped[str | None] = mapped_column(String(200))
    metric: Mapped[str | None] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Time)

    def to_entity(self) -> r.RegistryRecord:
        return r.RegistryRecord(
            id=self.id,
            adapter_id=self.adapter_id,
            decision=self.decision,
            model_name=self.model_name,
            version=self.version,
            alias=self.alias,
            metric=self.metric,
            value=self.value,
            reason=self.reason,
            created_at=r.utc(self.created_at),
        )


class EventRow(Base):
    __tablename__ = "lf_events"
    __table_args__ = (Index(None, "job_id", "id"), UniqueConstraint("event_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("lf_jobs.id"))
    adapter_id: Mapped[str | None] = mapped_column(ForeignKey("lf_adapters.id"))
    kind: Mapped[str] = mapped_column(String(32))
    step: Mapped[int | None] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Time)
    event_id: Mapped[str | None] = mapped_column(String(32))

    def to_entity(self) -> r.EventRecord:
        return r.EventRecord(
            id=self.id,
            job_id=self.job_id,
            adapter_id=self.adapter_id,
            kind=self.kind,
            step=self.step,
            payload=self.payload,
            created_at=r.utc(self.created_at),
        )


class TokenRow(Base):
    """An API token bound to one project: only its sha256 is kept, the token itself is shown once."""

    __tablename__ = "lf_tokens"
    __table_args__ = (UniqueConstraint("token_hash"), Index(None, "project"))

    id: Mapped[str] = mapped_column(Id, primary_key=True)
    project: Mapped[str] = mapped_column(Name)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Time)
    revoked_at: Mapped[datetime | None] = mapped_column(Time)

    def to_entity(self) -> r.TokenRecord:
        return r.TokenRecord(
            id=self.id,
            project=self.project,
            role=self.role,
            name=self.name,
            created_at=r.utc(self.created_at),
            revoked_at=r.utc_or_none(self.revoked_at),
        )
