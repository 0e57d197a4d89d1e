"""Per-worker caches: base models loaded once, adapters kept in a small LRU by version id."""

from __future__ import annotations

from collections import OrderedDict

import torch
from sqlalchemy.orm import Session

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.models import BUNDLED_MODEL_DIR, BaseModel, build_tiny_model, load_base_model
from sepen_store.errors import NotFound
from sepen_store.registry import version_bytes
from sepen_store.settings import BUNDLED_MODEL, TINY_MODEL, Settings
from sepen_store.tables import AdapterVersion

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelCache:
    """Base models by their service name, loaded on first use and kept for the worker's life."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, BaseModel] = {}

    def get(self, name: str) -> BaseModel:
        if name not in self.models:
            source = self.settings.models.get(name)
            if source is None:
                raise NotFound("model", name)
            device, dtype = self.settings.device, DTYPES[self.settings.dtype]
            if source == TINY_MODEL:
                model = build_tiny_model(0, device=device, dtype=dtype)
                model.model_id = name
            elif source == BUNDLED_MODEL:
                model = load_base_model(BUNDLED_MODEL_DIR, device=device, dtype=dtype, model_id=name)
            else:
                model = load_base_model(source, device=device, dtype=dtype, model_id=name)
            self.models[name] = model
        return self.models[name]


class AdapterCache:
    """Adapters by version id; versions are immutable, so a cached one never goes stale."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.entries: OrderedDict[str, KeyProjectionAdapter] = OrderedDict()

    def get(self, session: Session, version_id: str) -> KeyProjectionAdapter:
        if version_id in self.entries:
            self.entries.move_to_end(version_id)
            return self.entries[version_id]
        version = session.get(AdapterVersion, version_id)
        if version is None:
            raise NotFound("adapter version", version_id)
        adapter = KeyProjectionAdapter.from_bytes(version_bytes(session, version))
        self.entries[version_id] = adapter
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return adapter
