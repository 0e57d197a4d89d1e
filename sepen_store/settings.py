"""Service settings from SEPEN_* environment variables (listed in .env.example): shared, gateway and worker parts.

The same settings drive the embedded default (SQLite file + filesystem broker under data_dir, no
servers) and the full deployment (Postgres + Redis): same code paths, different values. Nothing is
read at import time: `from_env()` is the one place the environment is read, and constructing a
settings object directly (tests, the embedded runner) reads nothing but its arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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


class Settings(BaseSettings):
    """What the gateway and the workers share: where the database, the broker and the models are."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", env_ignore_empty=True)

    data_dir: Path = Path("var")
    database_url: str = Field("", description="empty: an SQLite file under data_dir (embedded)")
    broker_url: str = Field("", description="empty: a filesystem broker under data_dir (embedded)")
    visibility_timeout_s: int = Field(3600, ge=1)
    models: Annotated[dict[str, str], NoDecode] = Field(default_factory=lambda: dict(DEFAULT_MODELS))
    default_model: str = ""  # empty: the first of the models given, or sepen-toy when none are given

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
    compute_seconds_per_day: int = Field(28_800, ge=0)  # 8 hours of a worker per tenant and UTC day


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
    # A job's process is stopped when an attempt runs longer than its kind's limit (the job fails with
    # time_limit_exceeded), or when it has not stopped this long after a cancel (within one long step).
    generate_time_limit_s: float = Field(900.0, gt=0)
    finetune_time_limit_s: float = Field(43200.0, gt=0)
    cancel_grace_s: float = Field(5.0, ge=0)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPE_NAMES:
            raise ValueError(f"must be one of {', '.join(DTYPE_NAMES)}")
        return value


ALL_SETTINGS = (Settings, GatewaySettings, WorkerSettings)


def setting_names() -> set[str]:
    """Every SEPEN_* variable any part reads (what .env.example must list)."""
    return {f"{ENV_PREFIX}{name.upper()}" for cls in ALL_SETTINGS for name in cls.model_fields}
