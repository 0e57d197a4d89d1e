"""Shared fixtures: the tiny random SD-1.x- and SDXL-shaped models, built once per session (and fresh where a test
mutates them)."""

import os
import secrets
from contextlib import contextmanager

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """Shared and read-only: tests must leave its weights as they found them."""
    from sepen_core.models import build_tiny_model  # imported here: the service tests run without torch

    return build_tiny_model(seed=0)


@pytest.fixture
def fresh_tiny_model():
    from sepen_core.models import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_xl_model():
    """The tiny random model in SDXL's layout; shared and read-only like tiny_model."""
    from sepen_core.models import build_tiny_xl_model

    return build_tiny_xl_model(seed=0)


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
XDIST_WORKERS = 2  # scripts/test runs pytest-xdist with two workers (one per core of the CI machine)


def local_redis_url(db: int) -> str:
    """A database of the local Redis (127.0.0.1:6379) that is this test process's own: under pytest-xdist the second
    worker's numbers are 8 lower (the suite uses 11-14, and 3-6), so no two workers flush each other's keys."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    if worker >= XDIST_WORKERS:
        raise RuntimeError(f"the local Redis has databases for {XDIST_WORKERS} pytest-xdist workers, not more")
    return f"redis://127.0.0.1:6379/{db - 8 * worker}"


@contextmanager
def postgres_database(prefix: str, migrate: bool = True):
    """A fresh database on the local Postgres, migrated to head with Alembic (unless `migrate` is false: then
    empty), dropped afterwards. Yields its SQLAlchemy URL. No Postgres is a failure, not a skip: these tests need
    the real server."""
    import psycopg

    from sepen_store.database import upgrade_database

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        if migrate:
            upgrade_database(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on loopback (tests/seaweedfs.py), started on first use and stopped after the session."""
    from tests.seaweedfs import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket of the test's own."""
    return s3_server.new_bucket()
