"""Service settings, read once from SEPEN_* environment variables (listed in .env.example).

The same Settings drive the embedded default (SQLite file + filesystem broker under data_dir,
no servers) and the full deployment (Postgres + Redis): same code paths, different values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

TINY_MODEL = "tiny"  # model sources that are not paths: the tiny random model, the bundled toy-world model
BUNDLED_MODEL = "toy"


def _parse_models(text: str) -> dict[str, str]:
    """'name=source,name2=source2' -> {name: source}; a source is a local SD directory, 'tiny' or 'toy'."""
    models = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValueError(f"SEPEN_MODELS entry {item!r} must look like name=/path/to/model")
        models[name.strip()] = source.strip()
    return models


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("var")
    database_url: str = ""  # empty: SQLite file under data_dir (embedded)
    broker_url: str = ""  # empty: filesystem broker under data_dir (embedded)
    models: dict[str, str] = field(default_factory=lambda: {"sepen-tiny": TINY_MODEL, "sepen-toy": BUNDLED_MODEL})
    default_model: str = "sepen-toy"
    device: str = "cpu"
    dtype: str = "fp32"
    max_body_bytes: int = 1_048_576
    progress_interval_s: float = 1.0  # throttle for progress writes
    job_lease_s: float = 120.0  # a running job whose heartbeat is older than this was abandoned
    requeue_after_s: float = 300.0  # re-send a queued job's message when it has waited this long
    reconcile_interval_s: float = 30.0
    visibility_timeout_s: int = 3600
    checkpoint_every: int = 50
    adapter_cache_size: int = 8

    def __post_init__(self):
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{(self.data_dir / 'sepen.db').resolve()}")
        if self.default_model not in self.models:
            raise ValueError(f"SEPEN_DEFAULT_MODEL {self.default_model!r} is not in SEPEN_MODELS {sorted(self.models)}")

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict = {}
        simple = {"data_dir": Path, "database_url": str, "broker_url": str, "default_model": str, "device": str, "dtype": str,
                  "max_body_bytes": int, "progress_interval_s": float, "job_lease_s": float, "requeue_after_s": float,
                  "reconcile_interval_s": float, "visibility_timeout_s": int, "checkpoint_every": int,
                  "adapter_cache_size": int}
        for name, cast in simple.items():
            raw = env.get(f"SEPEN_{name.upper()}")
            if raw not in (None, ""):
                values[name] = cast(raw)
        if env.get("SEPEN_MODELS"):
            values["models"] = _parse_models(env["SEPEN_MODELS"])
            values.setdefault("default_model", next(iter(values["models"])))
        return cls(**values)
