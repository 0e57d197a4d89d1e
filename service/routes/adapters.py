"""Adapters: a tenant's adapters and immutable versions, a version's weights (sepen's file, or exported as a
diffusers or kohya LoRA or a full-rank delta), deleting a version."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response
from sqlalchemy.orm import Session

from sepen_core.config import MAX_EXPORT_RANK, ExportOptions
from sepen_core.errors import AdapterFormatError, ConfigError
from sepen_store.blobs import download_url
from sepen_store.errors import Conflict, NotFound
from sepen_store.registry import (
    MAX_VERSION,
    NAME_PATTERN,
    delete_version,
    get_adapter,
    latest_evaluations,
    list_adapters,
    resolve,
    version_blob,
    version_bytes,
)
from sepen_store.tables import AdapterVersion
from service.deps import SessionDep, TenantDep
from service.errors import ApiError, invalid_setting
from service.openapi import AUTHENTICATED, ETAG, RATE_LIMITED, errors, success
from service.routes.jobs import REDIRECTED, IfNoneMatch, Redirect, redirect_response
from service.schemas import AdapterOut, AdapterSummary, harm_check_of

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
WeightsFormat = Annotated[
    Literal["sepen", "diffusers", "kohya", "full"],
    Query(
        description="sepen: the stored file; diffusers: a PEFT LoRA for pipe.load_lora_weights; kohya: a LoRA for "
        "ComfyUI, A1111 and diffusers; full: the delta itself as `.diff` keys (ComfyUI, A1111). docs/interop.md"
    ),
]
Rank = Annotated[
    int | None,
    Query(
        ge=1,
        le=MAX_EXPORT_RANK,
        description="with format=diffusers or kohya only (422 with sepen or full): the LoRA rank of every layer "
        "(default: full rank)",
    ),
]
Energy = Annotated[
    float | None,
    Query(
        gt=0,
        le=1,
        description="with format=diffusers or kohya only (422 with sepen or full, or beside rank): per layer, the "
        "smallest rank keeping this share of the squared singular values",
    ),
]


@router.get(
    "",
    response_model=list[AdapterSummary],
    responses={**success(200, RATE_LIMITED), **errors(*AUTHENTICATED)},
    operation_id="listAdapters",
)
def list_tenant_adapters(tenant: TenantDep, session: SessionDep) -> list[AdapterSummary]:
    summaries = []
    for adapter, count, latest in list_adapters(session, tenant):
        check = None if latest is None else harm_check_of(latest)
        summaries.append(
            AdapterSummary(
                name=adapter.name,
                versions=count,
                latest=None if latest is None else latest.version,
                verdict=None if check is None else check.verdict,
                created_at=adapter.created_at,
            )
        )
    return summaries


@router.get(
    "/{name}",
    response_model=AdapterOut,
    responses={**success(200, RATE_LIMITED), **ADAPTER_ERRORS},
    operation_id="getAdapter",
)
def read_adapter(name: AdapterName, tenant: TenantDep, session: SessionDep) -> AdapterOut:
    """The adapter's versions, each with its latest evaluation against the base model (POST /evaluate)."""
    adapter = get_adapter(session, tenant, name)
    return AdapterOut.of(adapter, latest_evaluations(session, [v.id for v in adapter.versions]))


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
            "description": "the adapter as safetensors, in the format asked for",
            "headers": {
                **ETAG,
                "Content-Disposition": {
                    "description": "attachment; filename=name@N.safetensors, or name@N-<format>[-r<rank>|-e<energy>]"
                    ".safetensors for an export",
                    "schema": {"type": "string"},
                },
                **RATE_LIMITED,
            },
        },
        304: {"description": "not modified: If-None-Match matched the ETag", "headers": ETAG},
        **REDIRECTED,
        **ADAPTER_ERRORS,
        **errors(409, s409="adapter_not_exportable: the stored version is not a sepen adapter that can be converted"),
    },
    operation_id="downloadAdapterWeights",
)
def download_weights(
    name: AdapterName,
    version: VersionNumber,
    tenant: TenantDep,
    session: SessionDep,
    if_none_match: IfNoneMatch = None,
    format: WeightsFormat = "sepen",
    rank: Rank = None,
    energy: Energy = None,
    redirect: Redirect = False,
) -> Response:
    """The version's safetensors file, or the same adapter in the form other tools load (`format`, with `rank` or
    `energy` for a LoRA). Its ETag is the file's sha256 (an export's is weak: sha256 and the options), so
    If-None-Match saves a download."""
    options = _export_options(format, rank, energy)
    found = _find_version(session, tenant, name, version)
    if options is None:
        etag, filename = f'"{found.sha256}"', f"{name}@{version}.safetensors"
    else:
        etag, filename = f'W/"{found.sha256}.{options.label}"', f"{name}@{version}-{options.label}.safetensors"
    headers = {
        "ETag": etag,
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Cache-Control": "private, max-age=31536000, immutable",
    }  # name@N never changes
    if if_none_match == etag:
        return Response(status_code=304, headers=headers)
    if redirect and options is None:  # an export is made here, from the bytes
        blob = version_blob(session, found)
        url = download_url(session, blob, filename=filename, content_type="application/octet-stream")
        if url is not None:
            return redirect_response(url, etag)
    data = version_bytes(session, found)
    if options is not None:
        from sepen_core.export import export_adapter  # numpy, loaded by the first export rather than at start-up

        try:
            data = export_adapter(data, options.format, rank=options.rank, energy=options.energy).data
        except AdapterFormatError as exc:
            raise ApiError(409, "adapter_not_exportable", f"{name}@{version} cannot be exported: {exc}") from exc
    return Response(data, media_type="application/octet-stream", headers=headers)


def _export_options(format: str, rank: int | None, energy: float | None) -> ExportOptions | None:
    """None for sepen's own file; else the export's options, a 422 naming the query field at fault."""
    if format == "sepen":
        for field, value in (("rank", rank), ("energy", energy)):
            if value is not None:
                raise ApiError(
                    422,
                    "validation_error",
                    f"{field}: applies to format=diffusers or format=kohya, not to sepen's own file",
                    field=field,
                )
        return None
    try:
        return ExportOptions(format, rank, energy)
    except ConfigError as exc:
        raise invalid_setting(exc, exc.field) from exc


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
