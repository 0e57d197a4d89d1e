"""Telling a dependency outage from a bug: which driver errors mean the database, the broker or the object store does
not answer.

The gateway answers those with 503 and Retry-After instead of 500, and says which dependency is down without
the driver's text (it names hosts and ports).
"""

from __future__ import annotations

import kombu.exceptions
import redis.exceptions
from sqlalchemy import exc as sa_exc

from sepen_store.errors import StorageUnavailable

OUTAGE_RETRY_AFTER_S = 5


def outage_of(exc: BaseException) -> str | None:
    """'database', 'broker' or 'storage' (the object store of SEPEN_BLOB_BACKEND=s3) when `exc` says that dependency
    is unreachable, overloaded, restarting or refusing; else None.

    SQLAlchemy's OperationalError covers what a working query can meet from the server's side (connection
    refused or lost, shutdown, too many clients, SQLite's "database is locked"); InterfaceError a connection
    the driver lost; TimeoutError a pool with no free connection."""
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return "database"
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return "database"
    if isinstance(
        exc, kombu.exceptions.OperationalError | redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
    ):
        return "broker"
    if isinstance(exc, StorageUnavailable):
        return "storage"
    return None
