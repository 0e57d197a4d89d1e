"""What the OpenAPI document says each route answers: its error statuses, all with the one error model, and the
headers that come with them (Retry-After, the rate-limit headers, WWW-Authenticate, Location, ETag); and what the
service's settings add to the document (the webhook hosts it calls)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

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


NOT_CONTROL = "[^\\x00-\\x1f\\x7f-\\x9f]"  # what every text field of a request holds (service.schemas)
PORT = "(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"  # 0-65535


def with_service_settings(app: FastAPI, allowed_hosts: tuple[str, ...]) -> None:
    """Make app.openapi() write into the document what this service's settings decide, so that a request the schema
    allows is one the service takes: the hosts a webhook URL may name (SEPEN_WEBHOOK_ALLOWED_HOSTS)."""
    make_document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = make_document()  # FastAPI's, kept in app.openapi_schema
            url = document["components"]["schemas"]["WebhookIn"]["properties"]["url"]
            url.update(webhook_url_schema(allowed_hosts))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def webhook_url_schema(allowed_hosts: tuple[str, ...]) -> dict[str, Any]:
    """What a webhook URL must match: http(s) to one of the allowed hosts (a host without a port: any port), no
    credentials; nothing at all when the service allows none."""
    if not allowed_hosts:
        return {"not": {}, "description": "this service calls no webhooks (SEPEN_WEBHOOK_ALLOWED_HOSTS is empty)"}
    hosts = [host.replace(".", r"\.") + ("" if ":" in host else f"(?::{PORT})?") for host in sorted(allowed_hosts)]
    return {
        "pattern": f"^https?://(?:{'|'.join(hosts)})(?:[/?#]{NOT_CONTROL}*)?$",
        "description": f"an http(s) URL of one of the hosts this service calls: {', '.join(sorted(allowed_hosts))}",
    }
