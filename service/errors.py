"""One JSON error shape for every failure, and the exception handlers that produce it.

{"error": {"code": "job_not_found", "message": "job 'abc' not found", "field": null}}

ApiError                 raised by routes with an explicit status, code and field
sepen_store NotFound     404 <kind>_not_found        Conflict        409 conflict
sepen_store Unauthorized 401 (WWW-Authenticate)      IllegalTransition 409 illegal_transition
RequestValidationError   422 validation_error, `field` = the dotted path of the value at fault
HTTPException            its status (404 unknown path, 405, 413 body too large...)
anything else            500 internal_error, logged
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

from sepen_core.errors import ConfigError
from sepen_store.errors import Conflict, NotFound, Unauthorized

logger = logging.getLogger(__name__)

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_LOCATION_SOURCES = ("body", "query", "path", "header", "cookie")
_UNION_TAG = re.compile(r"[\[\]'(),]|^(str|int|float|bool|list|dict|none|function-\w+)$")
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


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
    if kind in ("model_attributes_type", "dict_type") and field is None:
        return None, "the request body must be a JSON object"
    return field, f"{field}: {message}" if field else message


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return error_response(404, exc.code, str(exc))


async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
    return error_response(409, exc.code, str(exc))


async def _unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
    return error_response(401, exc.code, str(exc), headers=BEARER_CHALLENGE)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    field, message = describe_validation_error(errors[0]) if errors else (None, "invalid request")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, "validation_error", message, field)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code) or HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace(
        "-", "_"
    )
    message = exc.detail if isinstance(exc.detail, str) else str(jsonable_encoder(exc.detail))
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "the service failed to handle this request; it was logged")


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _internal)
