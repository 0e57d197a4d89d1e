"""Refuse request bodies larger than settings.max_body_bytes with a 413 before they are parsed, and bodies in a
Content-Encoding the gateway does not decode (gzip, br...) with a 415, rather than read compressed bytes as JSON.

Checked twice: the declared Content-Length before a byte is read, and the bytes counted as they
stream in (a chunked body declares no length). Our own, rather than FastAPI's `max_body_size`,
because Starlette's limiter answers a declared oversize body in plain text, not our error shape.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response


class BodyTooLarge(HTTPException):
    """Raised from `receive` while the route reads the body; FastAPI re-raises HTTPExceptions: our handler answers."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than this service accepts ({max_bytes} bytes)")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response = error_response(
                415,
                "unsupported_content_encoding",
                f"this service does not decode request bodies sent with Content-Encoding {encoding[:40]!r}; send the "
                "JSON body as it is, without Content-Encoding",
            )
            await response(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, "body_too_large", BodyTooLarge(self.max_bytes).detail)
            await response(scope, receive, send)
            return
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_counted, send)
