"""Alembic environment: migrates the database named by the config (or by the SEPEN_* settings)."""

from alembic import context

from sepen_store.database import make_engine
from sepen_store.settings import Settings
from sepen_store.tables import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=url.startswith("sqlite")
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)  # its own pool (swapping in another would skip the dialect's first-connect setup)
    with engine.connect() as connection:
        if url.startswith("sqlite"):
            # SQLite alters a table by rebuilding it (batch mode), which drops the old one: with foreign keys enforced
            # that fails once other rows refer to it (blobs, jobs). Off for the migration; the pragma does nothing
            # inside a transaction, so it comes first.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        context.configure(
            connection=connection, target_metadata=Base.metadata, render_as_batch=url.startswith("sqlite")
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
