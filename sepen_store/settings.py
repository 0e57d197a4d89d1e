"""Service settings from SEPEN_* environment variables (listed in .env.example): shared, gateway and worker parts.

The same settings drive the embedded default (SQLite file + filesystem broker under data_dir, no
servers) and the full deployment (Postgres + Redis): same code paths, different values. Nothing is
read at import time: `from_env()` is the one place the environment is read, and constructing a
settings object directly (tests, the embedded runner) reads nothing but its arguments.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from sepen_core.config import BUNDLED_SOURCE, DTYPE_NAMES, TINY_SOURCE

ENV_PREFIX = "SEPEN_"
DEFAULT_MODELS = {"sepen-tiny": TINY_SOURCE, "sepen-toy": BUNDLED_SOURCE}


class SettingsError(ValueError):
    """A SEPEN_* variable has a value the service cannot use; the message names the variable."""


def parse_models(value: Any) -> Any:
    """'name=source,name2=source2' -> {name: source}; a source is a local SD directory, 'tiny' or 'toy'."""
    if not isinstance(value, str):
        return value
    models = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValueError(f"entry {item!r} must look like name=/path/to/model (or name=toy, name=tiny)")
        models[name.strip()] = source.strip()
    if not models:
        raise ValueError("name at least one model, as in sepen-toy=toy")
    return models


def parse_hosts(value: Any) -> Any:
    """'hooks.example.com,127.0.0.1:9000' -> ('hooks.example.com', '127.0.0.1:9000'): host names, each with an
    optional port (without one, any port of that host), lowercase."""
    if not isinstance(value, str):
        return value
    hosts = []
    for item in filter(None, (part.strip().lower() for part in value.split(","))):
        host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", host) or (port and not port.isdigit()):
            raise ValueError(f"entry {item!r} must be a host name or address, with an optional :port (no scheme)")
        hosts.append(item)
    return tuple(hosts)


class Settings(BaseSettings):
    """What the gateway and the workers share: where the database, the broker and the models are."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", env_ignore_empty=True)

    data_dir: Path = Path("var")
    database_url: str = Field("", description="empty: an SQLite file under data_dir (embedded)")
    broker_url: str = Field("", description="empty: a filesystem broker under data_dir (embedded)")
    visibility_timeout_s: int = Field(3600, ge=1)
    models: Annotated[dict[str, str], NoDecode] = Field(default_factory=lambda: dict(DEFAULT_MODELS))
    default_model: str = ""  # empty: the first of the models given, or sepen-toy when none are given
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with the job id while a job runs
    # Hosts a job's webhook may call (the gateway refuses others at submission, the workers check again before each
    # delivery); empty: webhooks are refused.
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # Where the bytes of blobs (images, adapter weights, finetune checkpoints) live: in their database rows, or in an
    # S3-compatible bucket, the row keeping the object's key, size and sha256 (docs/storage.md).
    blob_backend: Literal["database", "s3"] = "database"
    s3_endpoint_url: str = ""  # empty: AWS S3 in s3_region; else a server of its own (SeaweedFS, MinIO, Ceph...)
    s3_public_endpoint_url: str = ""  # the endpoint presigned URLs name, for clients; empty: s3_endpoint_url
    s3_bucket: str = ""
    s3_prefix: str = ""  # the start of every object key, e.g. "prod/" to share a bucket
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""  # both empty: boto3's own chain (AWS_* variables, an instance role, ...)
    s3_secret_access_key: str = ""
    s3_presign_ttl_s: int = Field(900, ge=1, le=604_800)  # how long a presigned download URL works (S3: 7 days max)
    # Compute seconds a tenant's jobs may run per UTC day (0: unlimited): the gateway refuses new jobs past it, and a
    # worker stops a running job that crosses it (a finetune keeps its checkpoint: the same request resumes from it).
    compute_seconds_per_day: int = Field(28_800, ge=0)  # 8 hours of a worker per tenant and UTC day

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        **sources: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # the environment only through from_env()

    @classmethod
    def from_env(cls, **overrides: Any):
        """Settings from the SEPEN_* environment variables; SettingsError names the variable at fault."""
        values = EnvSettingsSource(cls, env_prefix=ENV_PREFIX, env_ignore_empty=True)()
        try:
            return cls(**{**values, **overrides})
        except ValidationError as exc:
            error = exc.errors()[0]
            message = error["msg"].removeprefix("Value error, ")
            where = f"{ENV_PREFIX}{str(error['loc'][0]).upper()}: " if error["loc"] else ""
            raise SettingsError(where + message) from None

    _parse_models = field_validator("models", mode="before")(parse_models)
    _parse_hosts = field_validator("webhook_allowed_hosts", mode="before")(parse_hosts)

    @model_validator(mode="before")
    @classmethod
    def _default_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("default_model"):
            try:
                given = parse_models(data["models"]) if data.get("models") else None
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}MODELS: {exc}") from None
            data = {**data, "default_model": next(iter(given)) if given else "sepen-toy"}
        return data

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{(self.data_dir / 'sepen.db').resolve()}")
        if self.blob_backend == "s3" and not self.s3_bucket:
            raise ValueError(f"{ENV_PREFIX}S3_BUCKET: name the bucket when {ENV_PREFIX}BLOB_BACKEND is s3")
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key):
            raise ValueError(
                f"{ENV_PREFIX}S3_ACCESS_KEY_ID and {ENV_PREFIX}S3_SECRET_ACCESS_KEY: set both, or neither (then "
                "boto3 finds credentials itself)"
            )
        if self.default_model not in self.models:
            raise ValueError(
                f"{ENV_PREFIX}DEFAULT_MODEL {self.default_model!r} is not one of the models of "
                f"{ENV_PREFIX}MODELS ({', '.join(self.models)}); name one of them or leave it empty"
            )
        return self

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    def with_(self, **changes: Any):
        return type(self)(**{**self.model_dump(), **changes})


class GatewaySettings(Settings):
    """The API process's own settings."""

    max_body_bytes: int = Field(1_048_576, ge=1024)
    # Limits and quotas; 0 = unlimited. The request rate is per API key, counted in the broker's Redis (shared by
    # every gateway process) or in memory (embedded mode); the caps are per tenant, checked when a job is submitted.
    rate_limit_per_minute: int = Field(600, ge=0)
    max_queued_jobs_per_tenant: int = Field(1000, ge=0)
    # GET /metrics (Prometheus) is open like /healthz when empty; else it asks for `Authorization: Bearer <token>`.
    metrics_token: str = ""
    # FastAPI's OpenTelemetry spans, metrics and logs of each request, sent to the providers the process configures
    # (opentelemetry-instrument, or an SDK set up before the app is made).
    opentelemetry: bool = False
    # An API key's tenant is remembered this long in each gateway process (0: looked up on every request), so a
    # revoked key stops working within it.
    key_cache_ttl_s: float = Field(10.0, ge=0)
    # Database connections each gateway process keeps open for its hot path (key lookups, job reads, submissions):
    # a fixed pool, so a request beyond it waits for a connection rather than opening (and closing) one of its own.
    db_pool_size: int = Field(20, ge=1, le=500)
    # GET /jobs/{id}/events: a comment line at least this often on a quiet stream (proxies close silent
    # connections); the job row read this often without a Redis broker; a stream closed after this long (the client
    # reconnects with Last-Event-ID).
    events_heartbeat_s: float = Field(15.0, gt=0)
    events_poll_s: float = Field(1.0, gt=0)
    events_max_stream_s: float = Field(3600.0, gt=0)


class WorkerSettings(Settings):
    """A worker process's own settings: its device, its job lease and reconciler, its checkpoints and caches."""

    device: str = "cpu"
    dtype: str = "fp32"
    progress_interval_s: float = Field(1.0, ge=0)  # throttle for progress writes
    job_lease_s: float = Field(120.0, gt=0)  # a running job whose heartbeat is older than this was abandoned
    requeue_after_s: float = Field(300.0, gt=0)  # re-send a queued job's message when it has waited this long
    reconcile_interval_s: float = Field(30.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    adapter_cache_size: int = Field(8, ge=1)
    compile: bool = False  # torch.compile finetune steps' map-capture forward (worth it on a GPU)
    # A job's process is stopped when an attempt runs longer than its kind's limit (the job fails with
    # time_limit_exceeded), or when it has not stopped this long after a cancel (within one long step).
    generate_time_limit_s: float = Field(900.0, gt=0)
    # Batching: a worker that takes a generate job also claims up to generate_batch_jobs - 1 more queued generate
    # jobs that can share its UNet batch (same model, size, steps, guidance on/off, maps), each with its own adapter,
    # up to generate_batch_images images in all. 1: one job at a time.
    generate_batch_jobs: int = Field(8, ge=1, le=64)
    generate_batch_images: int = Field(16, ge=1, le=512)
    finetune_time_limit_s: float = Field(43200.0, gt=0)
    evaluate_time_limit_s: float = Field(3600.0, gt=0)
    cancel_grace_s: float = Field(5.0, ge=0)
    # A job's work waits this long for an unreachable database or object store (retrying with back-off) before its
    # job fails with database_unavailable or storage_unavailable; the worker itself waits out any outage to record
    # how a job ended.
    outage_grace_s: float = Field(300.0, ge=0)
    # Prometheus metrics of this worker at http://HOST:PORT/metrics; port 0: none.
    worker_metrics_port: int = Field(0, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    # Webhooks: signed with a key derived from this secret for each tenant (sepen_store.webhooks); a delivery that
    # does not get a 2xx is retried after webhook_backoff_s, then twice as long each time, webhook_max_attempts
    # tries in all. Each worker looks for due deliveries every webhook_poll_s.
    webhook_secret: str = ""
    webhook_max_attempts: int = Field(10, ge=1, le=50)
    webhook_backoff_s: float = Field(5.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_poll_s: float = Field(1.0, gt=0)
    # Retention, 0 = keep for ever: a finished job's images and heatmaps are deleted this many days after it finished;
    # a checkpoint that has not been written for this many days, or whose job has finished, is deleted. Job rows and
    # adapters are never deleted by retention. Each worker applies it every retention_interval_s.
    image_retention_days: float = Field(0.0, ge=0)
    checkpoint_retention_days: float = Field(7.0, ge=0)
    retention_interval_s: float = Field(3600.0, gt=0)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPE_NAMES:
            raise ValueError(f"must be one of {', '.join(DTYPE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _webhooks_are_signed(self) -> WorkerSettings:
        if self.webhook_allowed_hosts and len(self.webhook_secret) < 16:
            raise ValueError(
                f"{ENV_PREFIX}WEBHOOK_SECRET: set it (16 characters or more) when {ENV_PREFIX}WEBHOOK_ALLOWED_HOSTS "
                "allows webhooks: every delivery is signed with it"
            )
        return self


ALL_SETTINGS = (Settings, GatewaySettings, WorkerSettings)


def setting_names() -> set[str]:
    """Every SEPEN_* variable any part reads (what .env.example must list)."""
    return {f"{ENV_PREFIX}{name.upper()}" for cls in ALL_SETTINGS for name in cls.model_fields}
