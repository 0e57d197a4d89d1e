"""Per-request dependencies: settings, a database session, the Celery client, and the tenant behind the API key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from sepen_store.auth import authenticate
from sepen_store.settings import GatewaySettings
from service.rate_limits import enforce_rate_limit


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

# auto_error=False: a missing key must give our 401 (with the JSON error shape), not FastAPI's.
bearer = HTTPBearer(auto_error=False, description="an API key from `sepen-admin create-key`")


def get_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The tenant owning the request's API key; Unauthorized (401) when it is missing, unknown or revoked, and
    429 when the key is past its rate limit (counted only for valid keys)."""
    key = credentials.credentials if credentials else None
    tenant = authenticate(session, key)
    enforce_rate_limit(request, key)
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]

IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=128,
        pattern=r"^[!-~]+$",  # visible ASCII: no spaces, no control characters
        description="retrying a POST with the same key returns the job the first try created, and queues nothing "
        "new; 1-128 visible ASCII characters",
    ),
]
