"""The store's tests run on both backends: a module-scoped session factory on the embedded SQLite file and on a
fresh Postgres database, each migrated to head."""

import pytest

from sepen_store.database import make_engine, session_factory, upgrade_database
from tests.conftest import postgres_database


@pytest.fixture(params=["sqlite", "postgres"], scope="module")
def sessions(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'sepen.db'}"
        upgrade_database(url)
        engine = make_engine(url)
        yield session_factory(engine)
        engine.dispose()
        return
    with postgres_database("sepen_store_test") as url:
        engine = make_engine(url)
        yield session_factory(engine)
        engine.dispose()
