"""API keys: created by `sepen-admin create-key`, stored as sha256 hashes, resolved to a tenant per request."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

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
