"""The FastAPI app: `create_app(settings)` wires the engine, sessions, Celery client, error handlers and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from sepen_store.database import make_engine, session_factory
from sepen_store.events import EventHub, events_url
from sepen_store.logs import configure_logging
from sepen_store.object_store import object_store_for
from sepen_store.queue import make_celery
from sepen_store.rate_limits import RateLimiter, shared_counter_url
from sepen_store.settings import GatewaySettings
from service.body_limit import BodySizeLimit
from service.errors import ErrorsAsResponses, add_error_handlers
from service.metrics import GatewayMetrics, RequestMetrics
from service.metrics import router as metrics_router
from service.openapi import with_service_settings
from service.rate_limits import RateLimitHeaders
from service.routes import adapters, evaluate, finetune, generate, health, jobs, models, web

DESCRIPTION = """\
SepEn compositional finetuning of Stable-Diffusion-style models, as jobs.

`POST /finetune` queues a finetune that publishes the next version `name@N` of an adapter;
`POST /generate` queues sampling, optionally with an adapter and per-concept heatmaps; `POST /evaluate` compares
an adapter with its base model. Each answers 202 with the job as `GET /jobs/{id}` answers it (its links inside, in
`links`), plus `warnings`; follow `links.self` or `links.events`. Send `Authorization: Bearer <key>` (keys come from
`sepen-admin create-key`). Every error has the shape `{"error": {"code", "message", "field"}}`.

Limits: each API key may send a number of requests per minute (429 `rate_limited` past it, with
`Retry-After`; every authenticated answer carries `RateLimit-Limit`, `RateLimit-Remaining` and
`RateLimit-Reset`); each tenant may have a number of queued jobs (429 `queued_jobs_limit`) and
compute seconds per UTC day (429 `compute_quota_exceeded`). While the database is not answering,
requests get 503 with `Retry-After`.
"""


def _version() -> str:
    try:
        return version("sepen")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: GatewaySettings) -> FastAPI:
    engine = make_engine(settings.database_url)
    blobs = object_store_for(settings)  # None: blobs keep their bytes in the database
    url = events_url(settings.broker_url)
    event_hub = EventHub(url) if url else None  # one reader of job event streams for all of this process's watchers
    celery = make_celery(settings, fail_fast=True)  # the gateway only sends; a broker outage must not stall requests
    # Counted in the broker's Redis when there is one (shared by every gateway process), else in memory.
    rate_limiter = RateLimiter(settings.rate_limit_per_minute, shared_counter_url(settings.broker_url))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        celery.close()
        app.state.rate_limiter.close()
        if blobs is not None:
            blobs.close()
        if event_hub is not None:
            await event_hub.close()
        engine.dispose()

    # strict_content_type=False: a JSON body sent without a Content-Type is read as JSON (one sent as another
    # media type gets 415 naming it). FastAPI's own OpenTelemetry instrumentation only with SEPEN_OPENTELEMETRY: off,
    # it costs nothing; on but with no provider configured, it still looks for one on every request.
    app = FastAPI(
        title="sepen",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        strict_content_type=False,
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.blobs = blobs
    app.state.event_hub = event_hub
    app.state.sessions = session_factory(engine, blobs=blobs)
    app.state.celery = celery
    app.state.rate_limiter = rate_limiter
    app.state.metrics = GatewayMetrics(app.state.sessions, celery)
    add_error_handlers(app)
    with_service_settings(app, settings.webhook_allowed_hosts)
    # Each add_middleware wraps the ones before: ErrorsAsResponses (see service.errors) takes whatever escapes.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(ErrorsAsResponses)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)  # outermost: counts every answer, errors too
    for module in (finetune, generate, evaluate, jobs, adapters, models, health, web):  # web: the page at /
        app.include_router(module.router)
    app.include_router(metrics_router)  # GET /metrics, Prometheus text, not in the OpenAPI document
    return app


def app_from_env() -> FastAPI:
    """For `uvicorn --factory service.app:app_from_env`: settings from the SEPEN_* environment variables, and the
    process's log lines in SEPEN_LOG_FORMAT (uvicorn's own too), at uvicorn's --log-level."""
    settings = GatewaySettings.from_env()
    level = logging.getLogger("uvicorn").level or logging.INFO
    configure_logging(settings.log_format, level, process="gateway", also=("uvicorn", "uvicorn.access"))
    return create_app(settings)
