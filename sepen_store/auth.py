"""API keys: created by `sepen-admin create-key`, stored as sha256 hashes, resolved to a tenant per request (and
remembered for a few seconds by each gateway process, so that most requests need no key lookup)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from sepen_store.errors import Unauthorized
from sepen_store.tables import ApiKey, utcnow

KEY_PREFIX = "sk_sepen_"


def hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a fast hash is safe here (no password stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, tenant: str, name: str = "") -> str:
    """Create a key for `tenant` and return it; only its hash is stored, so it is shown once."""
    if not tenant or len(tenant) > 64 or not tenant.isprintable() or tenant != tenant.strip():
        raise ValueError("tenant must be 1-64 printable characters, with no control characters or outer spaces")
    if len(name) > 128 or not name.isprintable():
        raise ValueError("the key's name must be at most 128 printable characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant=tenant, name=name, prefix=key[: len(KEY_PREFIX) + 6], key_hash=hash_key(key)))
    session.commit()
    return key


def authenticate(session: Session, key: str | None) -> str:
    """The tenant of a valid, unrevoked key; Unauthorized otherwise."""
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    return row.tenant


class TenantCache:
    """Key hash -> tenant for `ttl_s` seconds (0: nothing is kept), at most `max_entries` keys, least recently used
    first out. Only valid keys are kept, so a new key works at once and a revoked one at most ttl_s longer."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000, *, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> str | None:
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is None:
                return None
            if entry[1] <= self.clock():
                del self._entries[key_hash]
                return None
            self._entries.move_to_end(key_hash)
            return entry[0]

    def put(self, key_hash: str, tenant: str) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._entries[key_hash] = (tenant, self.clock() + self.ttl_s)
            self._entries.move_to_end(key_hash)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def authenticate_cached(sessions: sessionmaker[Session], cache: TenantCache, key: str | None) -> str:
    """authenticate(), answered from `cache` while it remembers the key; a session is opened only on a miss."""
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    digest = hash_key(key)
    tenant = cache.get(digest)
    if tenant is None:
        with sessions() as session:
            tenant = authenticate(session, key)
        cache.put(digest, tenant)
    return tenant


def list_api_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    """Every key (or one tenant's), oldest first: prefix, tenant, name, created and revoked times; never the key."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.prefix)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.scalars(query))


def revoke_api_key(session: Session, prefix: str) -> int:
    if len(prefix) > 16 or not prefix.isprintable():  # no stored prefix looks like this (and NUL breaks Postgres)
        return 0
    rows = list(session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))))
    for row in rows:
        row.revoked_at = utcnow()
    session.commit()
    return len(rows)
