"""One JSON error shape for every failure, and the exception handlers that produce it.

{"error": {"code": "job_not_found", "message": "job 'abc' not found", "field": null}}

ApiError                 raised by routes with an explicit status, code and field
sepen_store NotFound     404 <kind>_not_found        Conflict        409 conflict
sepen_store Unauthorized 401 (WWW-Authenticate)      IllegalTransition 409 illegal_transition
sepen_store QuotaExceeded 429 (Retry-After)          queued_jobs_limit, compute_quota_exceeded
RequestValidationError   422 validation_error, `field` = the dotted path of the value at fault;
                         415 unsupported_media_type for a body sent as something other than JSON
HTTPException            its status (404 unknown path, 405, 413 body too large, 400 a body json cannot read...)
BodySizeLimit            413 body_too_large, 415 unsupported_content_encoding (service/body_limit.py)
a dependency outage      503 database_unavailable | broker_unavailable | storage_unavailable (Retry-After), the
                         driver's text only logged
anything else            500 internal_error, logged

The last two are answered by `ErrorsAsResponses`, the app's outermost own middleware: an exception that reached
Starlette's ServerErrorMiddleware would be answered too, but then re-raised to the server, which closes the
connection.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sepen_core.errors import ConfigError
from sepen_store.availability import OUTAGE_RETRY_AFTER_S, outage_of
from sepen_store.errors import Conflict, NotFound, QuotaExceeded, Unauthorized

logger = logging.getLogger(__name__)

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_LOCATION_SOURCES = ("body", "query", "path", "header", "cookie")
_UNION_TAG = re.compile(r"[\[\]'(),]|^(str|int|float|bool|list|dict|none|function-\w+)$")
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}
_BODY_NOT_AN_OBJECT = ("model_type", "model_attributes_type", "dict_type")
# FastAPI's message when the body cannot be decoded (json.loads of bytes that are not UTF-8/16/32).
_UNPARSABLE_BODY = "There was an error parsing the body"
# What a value that fails a path, query or header pattern must look like, by field.
PATTERN_HINTS = {
    "job_id": "not a job id: job ids are 32 hex digits, as POST /finetune and POST /generate return them",
    "name": "adapter names are 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
    "Idempotency-Key": "use 1-128 visible ASCII characters (no spaces or control characters)",
}


class ApiError(Exception):
    """An error a route raises on purpose: HTTP status, stable machine-readable code, and the field at fault."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def invalid_setting(exc: ConfigError, field: str) -> ApiError:
    """A sepen_core ConfigError as a 422 naming the request field it came from (`field`)."""
    message = str(exc).removeprefix(f"{exc.field}: ")
    return ApiError(422, "validation_error", f"{field}: {message}", field=field)


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "field": field}}, status_code=status, headers=headers
    )


def field_path(loc: tuple | list) -> str | None:
    """('body', 'recipe', 'steps') -> 'recipe.steps'; drops the source and pydantic's union-member tags."""
    parts = list(loc)
    if parts and parts[0] in _LOCATION_SOURCES:
        parts = parts[1:]
    kept = [str(p) for p in parts if isinstance(p, int) or not _UNION_TAG.search(str(p))]
    return ".".join(kept) or None


def describe_validation_error(error: dict) -> tuple[str | None, str]:
    """(field, message) for one pydantic error, the message saying what to change."""
    kind = error.get("type", "")
    if kind == "json_invalid":
        position = error["loc"][-1] if error.get("loc") else "?"
        detail = (error.get("ctx") or {}).get("error", "syntax error")
        return None, f"the request body is not valid JSON ({detail} at character {position}); send a JSON object"
    field = field_path(error.get("loc", ()))
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "missing":
        return field, f"add the required field '{field}'" if field else "send a JSON object as the request body"
    if kind == "extra_forbidden":
        return field, f"'{field}' is not a field of this request; remove it (see /docs for the fields)"
    if kind in _BODY_NOT_AN_OBJECT and field is None:
        return None, "the request body must be a JSON object"
    if kind == "string_pattern_mismatch" and field in PATTERN_HINTS:
        return field, f"{field}: {PATTERN_HINTS[field]}"
    return field, f"{field}: {message}" if field else message


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return not media or media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return error_response(404, exc.code, str(exc))


async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
    return error_response(409, exc.code, str(exc))


async def _unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
    return error_response(401, exc.code, str(exc), headers=BEARER_CHALLENGE)


async def _quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
    return error_response(429, exc.code, str(exc), headers={"Retry-After": str(exc.retry_after_s)})


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    content_type = request.headers.get("content-type")
    if errors and errors[0].get("type") in _BODY_NOT_AN_OBJECT and tuple(errors[0].get("loc", ())) == ("body",):
        if not _is_json(content_type):  # FastAPI parses only JSON media types: the body reached us as bytes
            return error_response(
                415,
                "unsupported_media_type",
                f"the request body must be a JSON object sent as 'Content-Type: application/json' "
                f"(this request said {content_type[:100]!r})",
            )
    field, message = describe_validation_error(errors[0]) if errors else (None, "invalid request")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, "validation_error", message, field)


def unparsable_body_reason(cause: BaseException | None) -> str:
    """Why json.loads gave up on a body, in words that say what to change (FastAPI keeps the error as the cause)."""
    if isinstance(cause, RecursionError):
        return "the request body nests arrays or objects too deeply to read; send a JSON object a few levels deep"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return "the request body holds an integer of more than 4300 digits; send numbers of ordinary size"
    return "the request body is not UTF-8 text; send a JSON object encoded as UTF-8"


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code) or HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace(
        "-", "_"
    )
    message = exc.detail if isinstance(exc.detail, str) else str(jsonable_encoder(exc.detail))
    if exc.status_code == 400 and message == _UNPARSABLE_BODY:
        code, message = "invalid_body", unparsable_body_reason(exc.__cause__)
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


def unexpected_error_response(exc: Exception, method: str, path: str) -> JSONResponse:
    """503 naming the dependency that is down (its driver's text only in the log), else 500 internal_error."""
    dependency = outage_of(exc)
    if dependency is not None:
        logger.warning("%s unavailable on %s %s: %s", dependency, method, path, exc)
        return error_response(
            503,
            f"{dependency}_unavailable",
            f"the service's {dependency} is not answering; try again in a few seconds",
            headers={"Retry-After": str(OUTAGE_RETRY_AFTER_S)},
        )
    logger.error("unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(500, "internal_error", "the service failed to handle this request; it was logged")


class ErrorsAsResponses:
    """Answer an exception that no handler took as an ordinary JSON response, so the connection stays open."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started:  # half a response is out: nothing left to do but let the server close the connection
                raise
            response = unexpected_error_response(exc, scope.get("method", ""), scope.get("path", ""))
            await response(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(QuotaExceeded, _quota)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
