"""Liveness (/healthz, no I/O) and readiness (/readyz: the database answers, the broker accepts a connection and, with
SEPEN_BLOB_BACKEND=s3, the object store's bucket answers).

Unauthenticated, so /readyz names a dependency that is down and nothing more: the driver's message (hosts,
ports, user names) goes to the log only.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sepen_store.availability import OUTAGE_RETRY_AFTER_S
from sepen_store.database import check_database
from sepen_store.errors import StorageUnavailable
from service.openapi import RETRY_AFTER
from service.schemas import HealthOut, ReadinessOut

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="getHealth")
def healthz() -> HealthOut:
    return HealthOut(status="ok")


def _check_database(request: Request) -> None:
    check_database(request.app.state.engine)


def _check_broker(request: Request) -> None:
    with request.app.state.celery.connection_for_write() as connection:
        # One immediate retry and a 2 s budget: a probe must answer before its own timeout.
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=2)


def _check_storage(request: Request) -> None:
    if not request.app.state.blobs.reachable():
        raise StorageUnavailable("the object store's bucket does not answer")


def _state(name: str, check, request: Request) -> str:
    try:
        check(request)
    except Exception as exc:  # any failure means not ready; what it was is for the log, not the client
        logger.warning("readiness: %s unavailable: %s: %s", name, type(exc).__name__, exc)
        return "unavailable"
    return "ok"


@router.get(
    "/readyz",
    response_model=ReadinessOut,
    responses={
        503: {
            "model": ReadinessOut,
            "description": "not ready: `checks` and `error.message` name the dependency that is down",
            "headers": RETRY_AFTER,
        }
    },
    operation_id="getReadiness",
)
def readyz(request: Request) -> JSONResponse:
    checks = {
        "database": _state("database", _check_database, request),
        "broker": _state("broker", _check_broker, request),
    }
    if request.app.state.blobs is not None:  # blobs in the object store, not the database
        checks["storage"] = _state("storage", _check_storage, request)
    failed = [name for name, state in checks.items() if state != "ok"]
    if not failed:
        return JSONResponse(ReadinessOut(status="ok", checks=checks).model_dump(exclude_none=True))
    message = " and ".join(failed) + (" is" if len(failed) == 1 else " are") + " not answering"
    body = ReadinessOut(
        status="unavailable", checks=checks, error={"code": "not_ready", "message": message, "field": None}
    )
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(OUTAGE_RETRY_AFTER_S)})
