"""Submitting a job: check its webhook, store it (idempotently) and commit, then send its broker message, surviving
a broker outage."""

from __future__ import annotations

import logging

from celery import Celery
from fastapi import Response
from sqlalchemy.orm import Session

from sepen_store.contract import DEFAULT_WEBHOOK_EVENTS, JobRequest, Webhook, request_json
from sepen_store.errors import Conflict, NotFound
from sepen_store.jobs import create_job, mark_not_enqueued
from sepen_store.queue import enqueue
from sepen_store.quotas import Quotas, check_quotas
from sepen_store.registry import parse_ref, resolve
from sepen_store.settings import GatewaySettings
from sepen_store.tables import AdapterVersion, Job
from sepen_store.webhooks import url_problem
from service.errors import ApiError
from service.openapi import AUTHENTICATED, LOCATION, RATE_LIMITED, WITH_BODY, errors, success
from service.schemas import SubmittedJob, WebhookIn, harm_check_of, json_response

logger = logging.getLogger(__name__)

REPLAYED = {
    "Idempotent-Replayed": {"description": "true: the job an earlier try created", "schema": {"type": "string"}}
}

# The OpenAPI answers of POST /finetune, /generate and /evaluate.
SUBMIT_RESPONSES = {
    **success(
        202,
        LOCATION,
        RATE_LIMITED,
        description="queued: the job as GET /jobs/{id} answers it (its URL: `links.self`, Location), and `warnings`",
    ),
    200: {
        "model": SubmittedJob,
        "description": "an Idempotency-Key replay: the job the first try created; nothing new is queued",
        "headers": {**LOCATION, **REPLAYED, **RATE_LIMITED},
    },
    **errors(
        *AUTHENTICATED,
        *WITH_BODY,
        404,
        409,
        s404="model_not_found, or adapter_not_found (generate)",
        s409="idempotency_key_reused: the Idempotency-Key came with a different request",
    ),
}


def webhook_of(body: WebhookIn | None, settings: GatewaySettings) -> Webhook | None:
    """The request's webhook as the job stores it; 422 naming `webhook` when this service sends none, or
    `webhook.url` when its URL is not one it may call."""
    if body is None:
        return None
    if not settings.webhook_allowed_hosts:
        raise ApiError(
            422,
            "validation_error",
            "webhook: this service sends no webhooks (its SEPEN_WEBHOOK_ALLOWED_HOSTS is empty); leave webhook out "
            "and follow the job at GET /jobs/{id}/events",
            field="webhook",
        )
    problem = url_problem(body.url, settings.webhook_allowed_hosts)
    if problem is not None:
        raise ApiError(422, "validation_error", f"webhook.url: {problem}", field="webhook.url")
    return Webhook(url=body.url, events=list(body.events or DEFAULT_WEBHOOK_EVENTS))


def pin_adapter(session: Session, tenant: str, ref: str) -> tuple[AdapterVersion, str]:
    """The version a request's adapter (`name`: its latest, or `name@N`) names now, and its pinned `name@N`; 404
    adapter_not_found naming `adapter`."""
    try:
        version = resolve(session, tenant, ref)
    except NotFound as exc:
        raise ApiError(
            404, "adapter_not_found", f"adapter {ref!r} not found (GET /adapters lists yours)", field="adapter"
        ) from exc
    return version, f"{parse_ref(ref)[0]}@{version.version}"


def quotas_of(settings: GatewaySettings) -> Quotas:
    return Quotas(
        max_queued_jobs=settings.max_queued_jobs_per_tenant, compute_seconds_per_day=settings.compute_seconds_per_day
    )


def submit_job(
    session: Session,
    celery: Celery,
    tenant: str,
    request: JobRequest,
    settings: GatewaySettings,
    *,
    idempotency_key: str | None,
    adapter_version_id: str | None = None,
) -> tuple[Job, bool]:
    """The stored job and whether this call created it (False: an Idempotency-Key retry, nothing is sent again).
    QuotaExceeded (429) when the tenant is at a cap."""
    kind = request.kind
    check_quotas(session, tenant, quotas_of(settings), idempotency_key=idempotency_key)
    try:
        job, created = create_job(
            session,
            tenant,
            kind,
            request_json(request),
            idempotency_key=idempotency_key,
            adapter_version_id=adapter_version_id,
        )
    except Conflict as exc:
        raise ApiError(
            409,
            "idempotency_key_reused",
            f"{exc}; use a new Idempotency-Key for a new request",
            field="Idempotency-Key",
        ) from exc
    if created:
        try:
            enqueue(celery, kind, job.id)
        except Exception as exc:  # any broker failure: the row is committed, the reconciler re-sends queued jobs
            logger.warning(
                "job %s stored but not enqueued (broker unavailable: %s); the reconciler will send it", job.id, exc
            )
            mark_not_enqueued(session, job.id)
    return job, created


def submitted(job: Job, created: bool, warnings: list[str] | None = None) -> Response:
    """202 with the job for a new submission; 200 with the same body for an Idempotency-Key replay."""
    url = f"/jobs/{job.id}"
    headers = {"Location": url}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    body = SubmittedJob.of(job).model_copy(update={"warnings": warnings or []})
    return json_response(body, 202 if created else 200, headers)


def adapter_warnings(version: AdapterVersion | None, ref: str | None) -> list[str]:
    """What a client should hear about the adapter it samples with: that its do-no-harm check found it hurts."""
    check = harm_check_of(version) if version is not None else None
    if check is None or check.verdict != "hurts":
        return []
    hurt = [" and ".join(row.concepts) for row in check.pairs + check.nouns if row.verdict == "hurts"]
    return [
        f"adapter {ref}: its do-no-harm check found it draws fewer of its objects than the base model "
        f"({'; '.join(hurt)}: GET /adapters/{ref.split('@')[0]}, versions[].check); the job runs as asked"
    ]
