"""Liveness (/healthz, no I/O) and readiness (/readyz: the database answers and the broker accepts a connection)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sepen_store.database import check_database
from service.schemas import HealthOut, ReadinessOut

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> HealthOut:
    return HealthOut(status="ok")


def _check_database(request: Request) -> str:
    try:
        check_database(request.app.state.engine)
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "ok"


def _check_broker(request: Request) -> str:
    try:
        with request.app.state.celery.connection_for_write() as connection:
            # One immediate retry and a 2 s budget: a probe must answer before its own timeout.
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=2)
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {exc}"
    return "ok"


@router.get("/readyz", response_model=ReadinessOut, responses={503: {"model": ReadinessOut}})
def readyz(request: Request) -> JSONResponse:
    checks = {"database": _check_database(request), "broker": _check_broker(request)}
    failed = [name for name, state in checks.items() if state != "ok"]
    if not failed:
        return JSONResponse(ReadinessOut(status="ok", checks=checks).model_dump(exclude_none=True))
    message = "; ".join(f"{name} {checks[name]}" for name in failed)
    body = ReadinessOut(
        status="unavailable", checks=checks, error={"code": "not_ready", "message": message, "field": None}
    )
    return JSONResponse(body.model_dump(), status_code=503)
