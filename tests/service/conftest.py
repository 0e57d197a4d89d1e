"""Gateway fixtures: a fresh Postgres database migrated with Alembic, Redis db 14 as the broker, an app, API keys,
the same app with the bundled toy model too, and with its broker or its database down."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from fastapi.testclient import TestClient

from sepen_store.auth import create_api_key
from sepen_store.database import make_engine, session_factory
from sepen_store.rate_limits import RateLimiter
from sepen_store.registry import publish_version
from sepen_store.settings import GatewaySettings
from sepen_store.tables import new_id
from service.app import create_app
from tests.conftest import local_redis_url, postgres_database

REDIS_URL = local_redis_url(14)
CLOSED_BROKER_URL = "redis://127.0.0.1:6390/0"  # nothing listens here: a broker that is down
CLOSED_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5499/sepen"  # nor here: a database that is down
MODELS = {"sepen-tiny": "tiny", "sd15": "/models/sd15"}


@pytest.fixture(scope="session")
def pg_url():
    """A database of its own for this test session, migrated to head, dropped at the end."""
    with postgres_database("sepen_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_client():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    client.flushdb()  # no Redis is a failure, not a skip: these tests need the real server
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def service_settings(pg_url, redis_client, tmp_path_factory) -> GatewaySettings:
    return GatewaySettings(
        data_dir=tmp_path_factory.mktemp("sepen"),
        database_url=pg_url,
        broker_url=REDIS_URL,
        models=MODELS,
        default_model="sepen-tiny",
        key_cache_ttl_s=0,  # these tests revoke keys and expect it at once; test_key_cache_api.py tests the cache
    )


@pytest.fixture(scope="session")
def client(service_settings):
    with TestClient(create_app(service_settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def toy_client(service_settings):
    """The service with the bundled toy model too: a model with a judge (its detector and test pairs) and a closed
    vocabulary (its world's nouns)."""
    with TestClient(create_app(service_settings.with_(models={**MODELS, "sepen-toy": "toy"}))) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def down_client(service_settings):
    """The same service, with its broker down."""
    with TestClient(create_app(service_settings.with_(broker_url=CLOSED_BROKER_URL))) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def db_down_client(service_settings):
    """The same service, with its database down."""
    with TestClient(create_app(service_settings.with_(database_url=CLOSED_DATABASE_URL))) as test_client:
        yield test_client


@contextmanager
def swapped_rate_limiter(client: TestClient, limiter: RateLimiter) -> Iterator[TestClient]:
    """The client's app counting with `limiter` (one with a fixed clock never meets a window's edge mid-test)."""
    state = client.app.state
    before, state.rate_limiter = state.rate_limiter, limiter
    try:
        yield client
    finally:
        state.rate_limiter = before
        limiter.close()


@pytest.fixture(scope="session")
def sessions(pg_url):
    engine = make_engine(pg_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def db(sessions):
    with sessions() as session:
        yield session


def _tenant() -> str:
    return f"tenant-{secrets.token_hex(4)}"


@pytest.fixture
def tenant() -> str:
    """A new tenant per test, so that listings start empty."""
    return _tenant()


@pytest.fixture
def other_tenant() -> str:
    return _tenant()


@pytest.fixture
def api_key(db, tenant) -> str:
    return create_api_key(db, tenant, "tests")


@pytest.fixture
def other_api_key(db, other_tenant) -> str:
    return create_api_key(db, other_tenant, "tests")


@pytest.fixture
def auth(api_key) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture
def other_auth(other_api_key) -> dict[str, str]:
    return {"Authorization": f"Bearer {other_api_key}"}


@pytest.fixture
def publish(db):
    """publish(tenant, name, data=...) stores a new adapter version as a finetune job would (no worker needed)."""

    def publish_adapter(
        tenant: str,
        name: str,
        data: bytes = b"not really safetensors",
        base_model: str = "sepen-tiny",
        metadata: dict | None = None,
    ):
        return publish_version(
            db,
            tenant=tenant,
            name=name,
            job_id=new_id(),
            data=data,
            base_model=base_model,
            base_fingerprint="f" * 64,
            sha256=hashlib.sha256(data).hexdigest(),
            metadata=metadata or {"concepts": [["cat", "dog"]], "steps": 3},
        )

    return publish_adapter


@pytest.fixture
def error_of():
    """error_of(response): the error object of a response, after checking it has the one error shape."""

    def check(response) -> dict:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body
        return body["error"]

    return check
