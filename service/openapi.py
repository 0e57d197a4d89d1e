"""What the OpenAPI document says each route answers: its error statuses, all with the one error model, and the
headers that come with them (Retry-After, the rate-limit headers, WWW-Authenticate, Location, ETag)."""

from __future__ import annotations

from typing import Any

from service.rate_limits import RATE_LIMIT_HEADERS
from service.schemas import ErrorOut


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


RETRY_AFTER = {"Retry-After": _header("seconds to wait before trying again", "integer")}
RATE_LIMITED = {name: _header(description, "integer") for name, description in RATE_LIMIT_HEADERS.items()}
LOCATION = {"Location": _header("the job's URL, /jobs/{id}")}
ETAG = {"ETag": _header("the file's sha256, quoted; send it as If-None-Match to get 304 while it is unchanged")}

_ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("the request body cannot be read: not UTF-8, nested too deeply, or an over-long integer", {}),
    401: (
        "no API key, or an unknown or revoked one",
        {"WWW-Authenticate": _header("Bearer: send 'Authorization: Bearer <key>'")},
    ),
    404: ("not found for this API key's tenant; `code` says what", {}),
    409: ("the request contradicts what is stored; `code` says how", {}),
    413: ("the request body is larger than this service accepts", {}),
    415: ("the request body was sent as something other than JSON, or in a Content-Encoding not decoded here", {}),
    422: ("a value is invalid; `field` names it and `message` says what to change", {}),
    429: (
        "rate_limited (this API key's requests per minute), queued_jobs_limit or compute_quota_exceeded "
        "(the tenant's caps); retry after Retry-After seconds",
        {**RETRY_AFTER, **RATE_LIMITED},
    ),
    503: (
        "the database is not answering (database_unavailable), or for a download the object store "
        "(storage_unavailable); retry after Retry-After seconds",
        RETRY_AFTER,
    ),
}

AUTHENTICATED = (401, 429, 503)  # every route behind an API key
WITH_BODY = (400, 413, 415, 422)  # every route that reads a JSON body


def errors(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these error statuses; `descriptions` (s404="...") replace the generic text."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses)):
        description, headers = _ERRORS[status]
        responses[status] = {
            "model": ErrorOut,
            "description": descriptions.get(f"s{status}", description),
            **({"headers": headers} if headers else {}),
        }
    return responses


def success(status: int, *header_groups: dict[str, Any], description: str | None = None) -> dict[int | str, Any]:
    """A success response's headers (FastAPI merges them with the route's own response model and description)."""
    headers = {name: spec for group in header_groups for name, spec in group.items()}
    return {status: {**({"description": description} if description else {}), "headers": headers}}
