"""The FastAPI app: `create_app(settings)` wires the engine, sessions, Celery client, error handlers and routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from sepen_store.database import make_engine, session_factory
from sepen_store.queue import make_celery
from sepen_store.settings import GatewaySettings
from service.body_limit import BodySizeLimit
from service.errors import add_error_handlers
from service.routes import adapters, finetune, generate, health, jobs, models

DESCRIPTION = """\
SepEn compositional finetuning of Stable-Diffusion-style models, as jobs.

`POST /finetune` queues a finetune that publishes the next version `name@N` of an adapter;
`POST /generate` queues sampling, optionally with an adapter and per-concept heatmaps. Both answer
202 with the job; poll `GET /jobs/{id}`. Send `Authorization: Bearer <key>` (keys come from
`sepen-admin create-key`). Every error has the shape `{"error": {"code", "message", "field"}}`.
"""


def _version() -> str:
    try:
        return version("sepen")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: GatewaySettings) -> FastAPI:
    engine = make_engine(settings.database_url)
    celery = make_celery(settings, fail_fast=True)  # the gateway only sends; a broker outage must not stall requests

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        celery.close()
        engine.dispose()

    app = FastAPI(title="sepen", version=_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    app.state.celery = celery
    add_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    for module in (finetune, generate, jobs, adapters, models, health):
        app.include_router(module.router)
    return app


def app_from_env() -> FastAPI:
    """For `uvicorn --factory service.app:app_from_env`: settings from the SEPEN_* environment variables."""
    return create_app(GatewaySettings.from_env())
