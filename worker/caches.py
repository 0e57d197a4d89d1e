"""Per-worker caches: base models loaded once, adapters kept in a small LRU by version id; each counts its hits and
misses (worker/metrics.py)."""

from __future__ import annotations

from collections import OrderedDict

from sqlalchemy.orm import Session

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.models import BaseModel, load_model
from sepen_store.errors import NotFound
from sepen_store.registry import get_version, version_bytes
from sepen_store.settings import WorkerSettings


class ModelCache:
    """Base models by their service name, loaded on first use and kept for the worker's life."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.models: dict[str, BaseModel] = {}
        self.hits = self.misses = 0

    def get(self, name: str) -> BaseModel:
        if name in self.models:
            self.hits += 1
        else:
            self.misses += 1
            source = self.settings.models.get(name)
            if source is None:
                raise NotFound("model", name)
            self.models[name] = load_model(
                source, device=self.settings.device, dtype=self.settings.dtype, model_id=name
            )
        return self.models[name]


class AdapterCache:
    """Adapters by version id; versions are immutable, so a cached one never goes stale."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.entries: OrderedDict[str, KeyProjectionAdapter] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, session: Session, version_id: str) -> KeyProjectionAdapter:
        if version_id in self.entries:
            self.hits += 1
            self.entries.move_to_end(version_id)
            return self.entries[version_id]
        self.misses += 1
        adapter = KeyProjectionAdapter.from_bytes(version_bytes(session, get_version(session, version_id)))
        self.entries[version_id] = adapter
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return adapter
