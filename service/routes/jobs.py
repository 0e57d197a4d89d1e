"""Jobs: read one, list a tenant's (newest first, keyset pages), cancel, fetch a finished job's images and heatmaps."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy.orm import Session

from sepen_store.job_outputs import get_image
from sepen_store.jobs import STATUSES, get_job, list_jobs, request_cancel
from service.deps import SessionDep, TenantDep
from service.errors import ApiError
from service.schemas import ErrorOut, JobOut, JobPage

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, Path(max_length=64, description="a job id as POST /finetune or /generate returned it")]
ImageIndex = Annotated[int, Path(ge=0, le=10_000, description="0-based, in the order of the job's result")]
Status = Literal[STATUSES]  # type: ignore[valid-type]
PNG = {200: {"content": {"image/png": {}}, "description": "PNG bytes"}, 404: {"model": ErrorOut}}


@router.get("", response_model=JobPage, responses={422: {"model": ErrorOut}})
def list_tenant_jobs(
    tenant: TenantDep,
    session: SessionDep,
    status: Annotated[Status | None, Query(description="only jobs in this status")] = None,
    kind: Annotated[Literal["finetune", "generate"] | None, Query()] = None,
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
    return JobPage(jobs=[JobOut.of(job) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": ErrorOut}})
def read_job(job_id: JobId, tenant: TenantDep, session: SessionDep) -> JobOut:
    return JobOut.of(get_job(session, tenant, job_id))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut, "description": "the job has already finished"}},
)
def cancel_job(job_id: JobId, tenant: TenantDep, session: SessionDep) -> JobOut:
    """A queued job is canceled at once; a running one becomes `canceling` and stops at its next step."""
    return JobOut.of(request_cancel(session, tenant, job_id))


def _png(request: Request, session: Session, tenant: str, job_id: str, kind: str, index: int) -> Response:
    get_job(session, tenant, job_id)  # another tenant's job is a 404 like a missing one
    blob = get_image(session, job_id, kind, index)
    etag = f'"{blob.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}  # a job's images never change
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(blob.data, media_type="image/png", headers=headers)


@router.get("/{job_id}/images/{index}", response_class=Response, responses=PNG)
def read_image(job_id: JobId, index: ImageIndex, request: Request, tenant: TenantDep, session: SessionDep) -> Response:
    return _png(request, session, tenant, job_id, "image", index)


@router.get("/{job_id}/heatmaps/{index}", response_class=Response, responses=PNG)
def read_heatmap(
    job_id: JobId, index: ImageIndex, request: Request, tenant: TenantDep, session: SessionDep
) -> Response:
    """The image with each concept's attention map drawn over it (generate jobs given `concepts`)."""
    return _png(request, session, tenant, job_id, "heatmap", index)
