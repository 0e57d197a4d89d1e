"""Per-request dependencies: settings, database sessions, the Celery client, and the tenant behind the API key.

The cheap ones are coroutines, which FastAPI runs in the event loop; a plain function costs a hop to the thread
pool. The tenant comes from a per-process cache of keys (SEPEN_KEY_CACHE_TTL_S), so most requests need no key
lookup. The hot reads (a key the cache does not know, GET /jobs/{id}, a stream's job row) and the submissions go
through a second, autocommit engine (GET /jobs/{id} through one of its connections, without a session): one round
trip a statement, with no BEGIN and COMMIT around it.
Things the gateway keeps per process beside what create_app made (the key cache, the autocommit engine, the events
publisher) are made on first use.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sepen_store.auth import TenantCache, authenticate_cached, hash_key
from sepen_store.database import make_engine, session_factory
from sepen_store.events import SESSION_INFO_KEY, publisher_for
from sepen_store.settings import GatewaySettings
from service.rate_limits import enforce_rate_limit_async

_made_lock = threading.RLock()  # reentrant: a thing's make() may ask for another (sessions for the engine)


def app_resource(app: FastAPI, name: str, make: Callable[[GatewaySettings], Any]) -> Any:
    """app.state.<name>, made from the app's settings on first use (once, whichever request comes first)."""
    value = getattr(app.state, name, None)
    if value is None:
        with _made_lock:
            value = getattr(app.state, name, None)
            if value is None:
                value = make(app.state.settings)
                setattr(app.state, name, value)
    return value


def tenant_cache(app: FastAPI) -> TenantCache:
    return app_resource(app, "tenant_cache", lambda settings: TenantCache(settings.key_cache_ttl_s))


def autocommit_engine(app: FastAPI) -> Engine:
    """The engine whose every statement commits alone (autocommit): single-statement reads, and submissions, whose
    statements (adapter and quota reads, then one INSERT) need no transaction around them (a concurrent submission
    could pass the same quota check inside one too; the idempotency key is a unique constraint). Its pool keeps
    SEPEN_DB_POOL_SIZE connections open, and opens no more. Disposed with the app."""

    def make(settings: GatewaySettings) -> Engine:
        engine = make_engine(settings.database_url, autocommit=True, pool_size=settings.db_pool_size)
        weakref.finalize(app, engine.dispose)
        return engine

    return app_resource(app, "autocommit_engine", make)


def autocommit_sessions(app: FastAPI) -> sessionmaker[Session]:
    """Sessions of the autocommit engine."""
    return app_resource(app, "autocommit_sessions", lambda _: session_factory(autocommit_engine(app)))


def events_publisher(app: FastAPI):
    """The publisher of the events the gateway's own job writes make (a cancel), or False without Redis."""
    return app_resource(app, "events_publisher", lambda settings: publisher_for(settings.broker_url) or False)


async def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


async def get_autocommit_sessions(request: Request) -> sessionmaker[Session]:
    """Sessions of one statement a transaction (autocommit_sessions)."""
    return autocommit_sessions(request.app)


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        publisher = events_publisher(request.app)
        if publisher:
            session.info[SESSION_INFO_KEY] = publisher
        yield session


@dataclass(frozen=True)
class SubmitContext:
    """What a submission route needs of its app (the settings, sessions of the autocommit engine, the Celery client)
    as one dependency: FastAPI's handling of each dependency costs a submission more than reading app.state."""

    settings: GatewaySettings
    sessions: sessionmaker[Session]
    celery: Celery


async def get_submit_context(request: Request) -> SubmitContext:
    app = request.app
    return app_resource(
        app, "submit_context", lambda settings: SubmitContext(settings, autocommit_sessions(app), app.state.celery)
    )


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
AutocommitSessionsDep = Annotated[sessionmaker[Session], Depends(get_autocommit_sessions)]
SessionDep = Annotated[Session, Depends(get_session)]
SubmitContextDep = Annotated[SubmitContext, Depends(get_submit_context)]

# auto_error=False: a missing key must give our 401 (with the JSON error shape), not FastAPI's.
bearer = HTTPBearer(auto_error=False, description="an API key from `sepen-admin create-key`")


async def get_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The tenant owning the request's API key; Unauthorized (401) when it is missing, unknown or revoked, and
    429 when the key is past its rate limit (counted only for valid keys). A key the cache remembers costs no
    thread and no database read; another is looked up in the thread pool."""
    key = credentials.credentials if credentials else None
    cache = tenant_cache(request.app)
    tenant = cache.get(hash_key(key)) if key else None
    if tenant is None:
        tenant = await run_in_threadpool(authenticate_cached, autocommit_sessions(request.app), cache, key)
    await enforce_rate_limit_async(request, key)
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
