"""The fixed pool of a busy path (make_engine(pool_size=N)) on a real Postgres: it never opens more than N
connections, and it pings a connection only after PING_AFTER_IDLE_S unused, which is where a server that dropped it
shows; a connection dropped while in steady use fails once, as with any pool, and the next checkout is fresh."""

import threading
import time

import psycopg
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from sepen_store import database
from tests.conftest import PG_ADMIN_URL, postgres_database


@pytest.fixture(scope="module")
def pg_url():
    with postgres_database("sepen_pool_test", migrate=False) as url:
        yield url


def backend_pid(connection) -> int:
    return connection.execute(text("SELECT pg_backend_pid()")).scalar_one()


def terminate(pid: int) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # returns once the backend has gone


@pytest.fixture
def engine(pg_url, monkeypatch):
    monkeypatch.setattr(database, "PING_AFTER_IDLE_S", 1.5)  # long beside a quick reuse on a loaded machine
    engine = database.make_engine(pg_url, autocommit=True, pool_size=2)
    pings = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda dbapi_connection: pings.append(1) or ping(dbapi_connection))
    engine.pings = pings
    yield engine
    engine.dispose()


def test_a_connection_in_steady_use_is_not_pinged_and_an_idle_one_is(engine):
    for _ in range(20):
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
    assert engine.pings == []
    time.sleep(1.7)
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    assert engine.pings == [1]


def test_a_connection_the_server_dropped_while_idle_is_replaced_before_use(engine):
    with engine.connect() as connection:
        pid = backend_pid(connection)
    terminate(pid)
    time.sleep(1.7)
    with engine.connect() as connection:  # the ping finds it dead: a new connection, and the statement runs
        assert backend_pid(connection) != pid


def test_a_connection_dropped_in_steady_use_fails_once_then_the_pool_is_fresh(engine):
    with engine.connect() as connection:
        pid = backend_pid(connection)
    terminate(pid)
    with pytest.raises(OperationalError), engine.connect() as connection:  # used again at once: not pinged
        connection.execute(text("SELECT 1"))
    with engine.connect() as connection:
        assert backend_pid(connection) != pid


def test_the_pool_never_opens_more_than_its_size(engine):
    opened = []
    event.listen(engine.pool, "connect", lambda *_: opened.append(1))
    barrier = threading.Barrier(8)

    def use() -> None:
        barrier.wait()
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_sleep(0.05)"))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 2 and engine.pool.checkedout() == 0
