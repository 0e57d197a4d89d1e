"""Engines and sessions for Postgres or the embedded SQLite file, and schema upgrades through Alembic."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sepen_store.blobs import STORE_INFO_KEY
from sepen_store.events import SESSION_INFO_KEY

PING_AFTER_IDLE_S = 1.0  # a fixed pool's connection unused for longer is pinged before use (make_engine)
MIGRATIONS = "migrations"  # the Alembic scripts live inside sepen_store, so every installation carries them


def make_engine(url: str, *, autocommit: bool = False, pool_size: int | None = None) -> Engine:
    """An engine on `url`. autocommit: every statement commits alone (the gateway's hot reads and its submissions):
    no BEGIN and no COMMIT or ROLLBACK around it, two round trips fewer.

    pool_size, for a busy path: a fixed pool of that many connections (a caller beyond it waits for one), and a
    connection is pinged before use only when it has sat unused for PING_AFTER_IDLE_S (pinging on every checkout
    was one round trip in three of a submission). Without it: 10 kept and up to 20 more opened while busy, each
    closed when it comes back (under a steady load of more than 10 at once, a connection opened and closed per
    request: a new Postgres backend process each time), each pinged before use."""
    options = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **options)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # WAL: readers never block the worker's writes
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    if not pool_size:
        pool = {"pool_size": 10, "max_overflow": 20, "pool_pre_ping": True}
        return create_engine(url, connect_args={"connect_timeout": 5}, **pool, **options)
    engine = create_engine(url, connect_args={"connect_timeout": 5}, pool_size=pool_size, max_overflow=0, **options)
    _ping_when_idle(engine, PING_AFTER_IDLE_S)
    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """pool_pre_ping's check (the dialect's ping), made only on a connection that has sat in the pool longer than
    idle_s: a server restart or an idle timeout shows there, and a connection in steady use is back within
    milliseconds. A connection that dies in use raises as it would have anyway, and invalidates the pool."""

    @event.listens_for(engine.pool, "checkin")
    def _returned(_dbapi_connection, record) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _check(dbapi_connection, record, _proxy) -> None:
        returned_at = record.info.get("returned_at")
        if returned_at is None or time.monotonic() - returned_at <= idle_s:
            return  # new, or just used
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise sa_exc.DisconnectionError(f"the connection did not answer a ping: {exc}") from exc
        if not alive:
            raise sa_exc.DisconnectionError("the connection did not answer a ping")


def check_database(engine: Engine) -> None:
    """One round trip (SELECT 1); raises the driver's error when the database does not answer."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def session_factory(engine: Engine, *, events=None, blobs=None) -> sessionmaker[Session]:
    """Sessions on `engine`; with `events` (a sepen_store.events.EventPublisher) the job writes made through them
    publish their events; with `blobs` (a sepen_store.object_store.ObjectStore, from object_store_for(settings)) the
    blobs they write keep their bytes in its bucket instead of their rows."""
    info = {SESSION_INFO_KEY: events} if events is not None else {}
    if blobs is not None:
        info[STORE_INFO_KEY] = blobs
    return sessionmaker(engine, expire_on_commit=False, info=info)


def migrations_dir() -> Path:
    """The directory of the Alembic scripts (env.py, versions/) in the installed sepen_store package (a directory
    on disk, as pip installs it: Alembic reads the scripts as files)."""
    return Path(str(resources.files("sepen_store").joinpath(MIGRATIONS)))


def alembic_config(url: str):
    """Alembic's configuration, built here rather than read from an ini file: the migrations of
    sepen_store/migrations/ against the database at `url`. The one place that knows where they live."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("path_separator", "os")
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations of sepen_store/migrations/ to the database at `url`."""
    from alembic import command

    if url.startswith("sqlite"):
        make_engine(url).dispose()  # creates the parent directory
    command.upgrade(alembic_config(url), revision)


def schema_status(engine: Engine) -> str | None:
    """None when the database is at the migrations' head; else what to tell the operator (run migrate)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string(hide_password=False)))
    head = scripts.get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return None
    where = engine.url.render_as_string(hide_password=True)
    found = "has no sepen tables" if current is None else f"is at schema {current}, not {head}"
    return f"the database at {where} {found}: run `sepen-admin migrate` first (with the same SEPEN_* settings)"
