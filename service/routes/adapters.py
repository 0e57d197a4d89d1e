"""Adapters: a tenant's adapters and immutable versions, a version's safetensors weights, deleting a version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from sqlalchemy.orm import Session

from sepen_store.errors import Conflict, NotFound
from sepen_store.registry import delete_version, get_adapter, list_adapters, resolve, version_bytes
from sepen_store.tables import AdapterVersion
from service.deps import SessionDep, TenantDep
from service.errors import ApiError
from service.schemas import AdapterOut, AdapterSummary, ErrorOut

router = APIRouter(prefix="/adapters", tags=["adapters"])

AdapterName = Annotated[str, Path(max_length=64, examples=["cat-dog"])]
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1, examples=[1])]


@router.get("", response_model=list[AdapterSummary])
def list_tenant_adapters(tenant: TenantDep, session: SessionDep) -> list[AdapterSummary]:
    return [
        AdapterSummary(name=adapter.name, versions=count, latest=latest, created_at=adapter.created_at)
        for adapter, count, latest in list_adapters(session, tenant)
    ]


@router.get("/{name}", response_model=AdapterOut, responses={404: {"model": ErrorOut}})
def read_adapter(name: AdapterName, tenant: TenantDep, session: SessionDep) -> AdapterOut:
    return AdapterOut.of(get_adapter(session, tenant, name))


def _find_version(session: Session, tenant: str, name: str, number: int) -> AdapterVersion:
    try:
        return resolve(session, tenant, f"{name}@{number}")
    except ValueError as exc:  # a name that breaks the naming rules cannot exist
        raise NotFound("adapter", name) from exc


@router.get(
    "/{name}/{version}/weights",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the adapter as safetensors"},
        404: {"model": ErrorOut},
    },
)
def download_weights(
    name: AdapterName, version: VersionNumber, request: Request, tenant: TenantDep, session: SessionDep
) -> Response:
    """The version's safetensors file; its ETag is the file's sha256, so If-None-Match saves a download."""
    found = _find_version(session, tenant, name, version)
    etag = f'"{found.sha256}"'
    headers = {
        "ETag": etag,
        "Content-Disposition": f'attachment; filename="{name}@{version}.safetensors"',
        "Cache-Control": "private, max-age=31536000, immutable",
    }  # name@N never changes
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(version_bytes(session, found), media_type="application/octet-stream", headers=headers)


@router.delete(
    "/{name}/{version}",
    status_code=204,
    response_class=Response,
    responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut, "description": "an unfinished job uses it"}},
)
def delete_adapter_version(
    name: AdapterName, version: VersionNumber, tenant: TenantDep, session: SessionDep
) -> Response:
    """Delete name@N for good (its number is never reused), unless a queued or running job will use it."""
    _find_version(session, tenant, name, version)
    try:
        delete_version(session, tenant, name, version)
    except Conflict as exc:
        raise ApiError(409, "adapter_in_use", str(exc)) from exc
    return Response(status_code=204)
