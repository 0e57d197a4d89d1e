"""Jobs: read one, list a tenant's (newest first, keyset pages), cancel, follow one's events (Server-Sent Events),
read its webhook deliveries, fetch a finished job's images and heatmaps."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from sqlalchemy.orm import Session

from sepen_store.blobs import blob_bytes, download_url
from sepen_store.job_outputs import get_image
from sepen_store.jobs import STATUSES, get_job, job_view, list_jobs, request_cancel
from sepen_store.webhooks import job_deliveries
from service.deps import AutocommitSessionsDep, SessionDep, SettingsDep, TenantDep, autocommit_engine
from service.errors import ApiError
from service.job_events import HEARTBEAT, MEDIA_TYPE, RETRY_MS, event_stream_response
from service.openapi import AUTHENTICATED, ETAG, RATE_LIMITED, errors, success
from service.schemas import DeliveryList, DeliveryOut, JobOut, JobPage, json_response

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[
    str,
    Path(pattern=r"^[0-9a-f]{32}$", description="a job id (32 hex digits) as POST /finetune or /generate returned it"),
]
ImageIndex = Annotated[int, Path(ge=0, le=10_000, description="0-based, in the order of the job's result")]
IfNoneMatch = Annotated[
    str | None, Header(alias="If-None-Match", max_length=200, description="the ETag of a copy you have: 304 if same")
]
Redirect = Annotated[
    bool,
    Query(
        description="true: when the file is in the object store (SEPEN_BLOB_BACKEND=s3), answer 307 with a presigned "
        "URL of it in Location, valid SEPEN_S3_PRESIGN_TTL_S seconds, instead of the bytes; a file in the database, "
        "or adapter weights exported to another format, come as usual (200). docs/storage.md"
    ),
]
REDIRECTED = {
    307: {
        "description": "redirect=true and the file is in the object store: GET Location (a presigned URL, no "
        "Authorization header) for the bytes",
        "headers": {
            "Location": {"description": "a presigned URL of the object store", "schema": {"type": "string"}},
            **ETAG,
            **RATE_LIMITED,
        },
    }
}
Status = Literal[STATUSES]  # type: ignore[valid-type]
JOB_ERRORS = errors(*AUTHENTICATED, 404, 422, s404="job_not_found: no such job for this API key's tenant")
PNG = {
    200: {
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        "description": "PNG bytes",
        "headers": {**ETAG, **RATE_LIMITED},
    },
    304: {"description": "not modified: If-None-Match matched the ETag", "headers": ETAG},
    **REDIRECTED,
    **errors(
        *AUTHENTICATED,
        404,
        422,
        s404="job_not_found, or image_not_found / heatmap_not_found at that index (also once image retention deleted "
        "it)",
    ),
}
LastEventId = Annotated[
    int | None,
    Header(
        alias="Last-Event-ID",
        ge=0,
        le=2**53,
        description="the `id` of the last event you received: the stream resumes after it (an EventSource sends it "
        "when it reconnects)",
        # A header is text: the document says integer, not FastAPI's anyOf integer/null ("null" is no event id).
        json_schema_extra={"anyOf": None, "type": "integer", "minimum": 0, "maximum": 2**53},
    ),
]
# One event of the stream (OpenAPI 3.1: the schema of a text/event-stream describes each event); `data` is a JSON
# object, its fields listed in the description below.
EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"type": "string", "enum": ["status", "progress"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
EVENTS = {
    200: {
        "content": {MEDIA_TYPE: {"schema": EVENT_SCHEMA}},
        "description": f"""Server-Sent Events, each `id: <seq>`, `event: status | progress` and `data:` one JSON
object: `seq`, `type`, `job_id`, `kind`, `status`, `at`, `progress`, `result` (as stored: image indices, the adapter
ref; no finetune summary) and `error` (`code`, `message`). The first event is the job as it is (`status`), or, with
Last-Event-ID, the events after that one. A comment line (`{HEARTBEAT.decode().strip()}`) follows every quiet
SEPEN_EVENTS_HEARTBEAT_S; the stream ends after the event of a finished job, or after SEPEN_EVENTS_MAX_STREAM_S
(reconnect with Last-Event-ID; `retry: {RETRY_MS}` suggests how soon).""",
        "headers": RATE_LIMITED,
    },
    204: {
        "description": "the job has finished and Last-Event-ID is its last event: nothing more will come (an "
        "EventSource stops reconnecting)",
        "headers": RATE_LIMITED,
    },
    **JOB_ERRORS,
}


@router.get(
    "",
    response_model=JobPage,
    responses={**success(200, RATE_LIMITED), **errors(*AUTHENTICATED, 422)},
    operation_id="listJobs",
)
def list_tenant_jobs(
    tenant: TenantDep,
    session: SessionDep,
    status: Annotated[Status | None, Query(description="only jobs in this status")] = None,
    kind: Annotated[Literal["finetune", "generate", "evaluate"] | None, Query()] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobPage:
    try:
        jobs, next_cursor = list_jobs(session, tenant, status=status, kind=kind, cursor=cursor, limit=limit)
    except ValueError as exc:
        raise ApiError(
            422,
            "validation_error",
            "cursor: not a next_cursor this API returned; start again without it",
            field="cursor",
        ) from exc
    return JobPage(jobs=[JobOut.of(job, summary=False) for job in jobs], next_cursor=next_cursor)


@router.get(
    "/{job_id}", response_model=JobOut, responses={**success(200, RATE_LIMITED), **JOB_ERRORS}, operation_id="getJob"
)
def read_job(job_id: JobId, tenant: TenantDep, request: Request) -> Response:
    with autocommit_engine(request.app).connect() as connection:
        job = job_view(connection, tenant, job_id)
    return json_response(JobOut.of(job))


@router.get("/{job_id}/events", response_class=Response, responses=EVENTS, operation_id="streamJobEvents")
async def stream_job_events(
    job_id: JobId,
    tenant: TenantDep,
    sessions: AutocommitSessionsDep,
    settings: SettingsDep,
    request: Request,
    last_event_id: LastEventId = None,
) -> Response:
    """The job's progress, status changes and result as they happen (`text/event-stream`), without polling."""
    hub = request.app.state.event_hub
    return await event_stream_response(sessions, settings, hub, tenant, job_id, last_event_id)


@router.get(
    "/{job_id}/deliveries",
    response_model=DeliveryList,
    responses={**success(200, RATE_LIMITED), **JOB_ERRORS},
    operation_id="listJobDeliveries",
)
def list_deliveries(
    job_id: JobId,
    tenant: TenantDep,
    sessions: AutocommitSessionsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> Response:
    """The job's webhook deliveries, newest event first: each one's state and every attempt (time, HTTP status,
    error, duration). A progress report not yet sent is replaced by the next one."""
    with sessions() as session:
        job_view(session.connection(), tenant, job_id)  # another tenant's job is a 404 like a missing one
        deliveries = [DeliveryOut.of(delivery) for delivery in job_deliveries(session, job_id, limit=limit)]
    return json_response(DeliveryList(deliveries=deliveries))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses={
        **success(202, RATE_LIMITED),
        **JOB_ERRORS,
        **errors(409, s409="illegal_transition: the job has already finished"),
    },
    operation_id="cancelJob",
)
def cancel_job(job_id: JobId, tenant: TenantDep, session: SessionDep) -> JobOut:
    """A queued job is canceled at once; a running one becomes `canceling` and stops at its next step."""
    return JobOut.of(request_cancel(session, tenant, job_id))


def redirect_response(url: str, etag: str) -> Response:
    """307 to a presigned URL; not cached, since the URL expires."""
    return Response(status_code=307, headers={"Location": url, "ETag": etag, "Cache-Control": "private, no-store"})


def _png(
    session: Session, tenant: str, job_id: str, kind: str, index: int, if_none_match: str | None, redirect: bool
) -> Response:
    get_job(session, tenant, job_id)  # another tenant's job is a 404 like a missing one
    blob = get_image(session, job_id, kind, index)
    etag = f'"{blob.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}  # a job's images never change
    if if_none_match == etag:
        return Response(status_code=304, headers=headers)
    url = download_url(session, blob) if redirect else None
    if url is not None:
        return redirect_response(url, etag)
    return Response(blob_bytes(session, blob), media_type="image/png", headers=headers)


@router.get("/{job_id}/images/{index}", response_class=Response, responses=PNG, operation_id="getJobImage")
def read_image(
    job_id: JobId,
    index: ImageIndex,
    tenant: TenantDep,
    session: SessionDep,
    if_none_match: IfNoneMatch = None,
    redirect: Redirect = False,
) -> Response:
    return _png(session, tenant, job_id, "image", index, if_none_match, redirect)


@router.get("/{job_id}/heatmaps/{index}", response_class=Response, responses=PNG, operation_id="getJobHeatmap")
def read_heatmap(
    job_id: JobId,
    index: ImageIndex,
    tenant: TenantDep,
    session: SessionDep,
    if_none_match: IfNoneMatch = None,
    redirect: Redirect = False,
) -> Response:
    """The image with each concept's attention map drawn over it (generate jobs given `concepts`)."""
    return _png(session, tenant, job_id, "heatmap", index, if_none_match, redirect)
