"""SQLAlchemy 2 tables of the service: API keys, jobs, adapters and their versions, images, checkpoints, blobs, and
the webhook deliveries of jobs.

Portable between Postgres (full deployment) and SQLite (embedded default); Alembic revisions in
sepen_store/migrations/ create exactly these.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive strings, Postgres timestamptz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class seconds_between(FunctionElement):  # noqa: N801 - used like a SQL function: seconds_between(start, end)
    """Seconds from one timestamp to another, in SQL, on both backends (each spells it its own way)."""

    type = Float()
    inherit_cache = True


@compiles(seconds_between, "postgresql")
def _seconds_between_postgres(element, compiler, **kw):
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"EXTRACT(EPOCH FROM ({end} - {start}))"


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element, compiler, **kw):
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings; the key itself is never stored
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the whole key
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


class Blob(Base):
    """Bytes every gateway and worker can read without a shared filesystem: in `data`, or (SEPEN_BLOB_BACKEND=s3) in
    the object store at `object_key`, exactly one of the two (sepen_store.blobs)."""

    __tablename__ = "blobs"
    __table_args__ = (UniqueConstraint("object_key", name="uq_blobs_object_key"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)  # a large model's checkpoint passes 2 GiB
    content_type: Mapped[str] = mapped_column(String(64))
    # Deferred: a row is read for its metadata (an ETag, a presigned URL) without its bytes.
    data: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    object_key: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_tenant_status", "tenant", "status"),  # a tenant's queued jobs (quotas)
        Index("ix_jobs_tenant_finished", "tenant", "finished_at"),  # a tenant's compute today (quotas)
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # finetune | generate
    status: Mapped[str] = mapped_column(String(16), default="queued")
    request: Mapped[dict] = mapped_column(JSON)
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    adapter_version_id: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.id"))  # generate jobs
    progress: Mapped[dict | None] = mapped_column(JSON)
    result: Mapped[dict | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # Seconds the job's attempts have run, added at each heartbeat and at its end (an attempt whose worker
    # died keeps what it ran until its last heartbeat): what the compute quota counts.
    compute_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # The number of the job's last event (a status change or a progress report), counted up by the write that made
    # it: the id of GET /jobs/{id}/events, which a client resumes from with Last-Event-ID.
    event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook: Mapped[dict | None] = mapped_column(JSON)  # {url, events} when the request gave one


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_adapters_tenant_name"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    next_version: Mapped[int] = mapped_column(Integer, default=1)  # numbers are never reused, even after a delete
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    versions: Mapped[list[AdapterVersion]] = relationship(back_populates="adapter", order_by="AdapterVersion.version")


class AdapterVersion(Base):
    """Immutable: `name@version`. One per finetune job (job_id is unique), whatever retries happen."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version", name="uq_adapter_versions_adapter_version"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id"))
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(32), unique=True)
    base_model: Mapped[str] = mapped_column(String(128))
    base_fingerprint: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))  # of the safetensors file
    size: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict] = mapped_column("metadata", JSON)
    blob_id: Mapped[str] = mapped_column(ForeignKey("blobs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    adapter: Mapped[Adapter] = relationship(back_populates="versions")


class JobImage(Base):
    __tablename__ = "job_images"
    __table_args__ = (UniqueConstraint("job_id", "kind", "index", name="uq_job_images_job_kind_index"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # image | heatmap
    index: Mapped[int] = mapped_column(Integer)
    blob_id: Mapped[str] = mapped_column(ForeignKey("blobs.id"))


class Checkpoint(Base):
    """A running finetune's latest checkpoint (files of sepen_core.finetuning), so any worker can resume it."""

    __tablename__ = "checkpoints"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer)
    blob_id: Mapped[str] = mapped_column(ForeignKey("blobs.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One job event on its way to the job's webhook: written in the transaction that changed the job (so no event
    is lost), sent by a worker's delivery loop, retried with back-off; `log` keeps every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    tenant: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(16))  # what the webhook's `events` calls it: a status, or progress
    event_seq: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict] = mapped_column(JSON)  # the JobEvent, as JSON
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()  # delivered, or given up
    last_status: Mapped[int | None] = mapped_column(Integer)  # the last attempt's HTTP status; null: no answer
    log: Mapped[list] = mapped_column(JSON, default=list)  # [{at, status, error, duration_ms}] per attempt
