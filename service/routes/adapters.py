"""Adapters: a tenant's adapters and immutable versions, a version's safetensors weights, deleting a version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from sqlalchemy.orm import Session

from sepen_store.errors import Conflict, NotFound
from sepen_store.registry import (
    MAX_VERSION,
    NAME_PATTERN,
    delete_version,
    get_adapter,
    list_adapters,
    resolve,
    version_bytes,
)
from sepen_store.tables import AdapterVersion
from service.deps import SessionDep, TenantDep
from service.errors import ApiError
from service.openapi import AUTHENTICATED, ETAG, RATE_LIMITED, errors, success
from service.routes.jobs import IfNoneMatch
from service.schemas import AdapterOut, AdapterSummary

router = APIRouter(prefix="/adapters", tags=["adapters"])

AdapterName = Annotated[
    str,
    Path(
        pattern=f"^{NAME_PATTERN.pattern}$",
        description="1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
        examples=["cat-dog"],
    ),
]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_VERSION, examples=[1])]
ADAPTER_ERRORS = errors(
    *AUTHENTICATED, 404, 422, s404="adapter_not_found or adapter_version_not_found for this API key's tenant"
)


@router.get(
    "",
    response_model=list[AdapterSummary],
    responses={**success(200, RATE_LIMITED), **errors(*AUTHENTICATED)},
    operation_id="listAdapters",
)
def list_tenant_adapters(tenant: TenantDep, session: SessionDep) -> list[AdapterSummary]:
    return [
        AdapterSummary(name=adapter.name, versions=count, latest=latest, created_at=adapter.created_at)
        for adapter, count, latest in list_adapters(session, tenant)
    ]


@router.get(
    "/{name}",
    response_model=AdapterOut,
    responses={**success(200, RATE_LIMITED), **ADAPTER_ERRORS},
    operation_id="getAdapter",
)
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
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the adapter as safetensors",
            "headers": {
                **ETAG,
                "Content-Disposition": {
                    "description": "attachment; filename=name@N.safetensors",
                    "schema": {"type": "string"},
                },
                **RATE_LIMITED,
            },
        },
        304: {"description": "not modified: If-None-Match matched the ETag", "headers": ETAG},
        **ADAPTER_ERRORS,
    },
    operation_id="downloadAdapterWeights",
)
def download_weights(
    name: AdapterName, version: VersionNumber, tenant: TenantDep, session: SessionDep, if_none_match: IfNoneMatch = None
) -> Response:
    """The version's safetensors file; its ETag is the file's sha256, so If-None-Match saves a download."""
    found = _find_version(session, tenant, name, version)
    etag = f'"{found.sha256}"'
    headers = {
        "ETag": etag,
        "Content-Disposition": f'attachment; filename="{name}@{version}.safetensors"',
        "Cache-Control": "private, max-age=31536000, immutable",
    }  # name@N never changes
    if if_none_match == etag:
        return Response(status_code=304, headers=headers)
    return Response(version_bytes(session, found), media_type="application/octet-stream", headers=headers)


@router.delete(
    "/{name}/{version}",
    status_code=204,
    response_class=Response,
    responses={
        **success(204, RATE_LIMITED, description="deleted"),
        **ADAPTER_ERRORS,
        **errors(409, s409="adapter_in_use: a queued or running job will use this version"),
    },
    operation_id="deleteAdapterVersion",
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
