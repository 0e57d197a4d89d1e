"""The web page: GET / and its static files under /web/ (shipped in service/web/), open like /docs; the page itself
calls the API with the key a person signs in with."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import ApiError

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Everything the page loads comes from this gateway: no CDN, no inline script; images arrive as blob: URLs (fetched
# with the Authorization header, which <img src> cannot send).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) on each load, so an upgraded gateway serves its own page
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = WEB_DIR / name
    media_type = MEDIA_TYPES.get(path.suffix)
    # Only the directory's own files: a name is one path segment (the route's {name} matches no '/'), never hidden.
    if media_type is None or name.startswith(".") or not path.is_file():
        raise ApiError(404, "not_found", f"/web/{name}: no such file of the web page")
    return FileResponse(path, media_type=media_type, headers=HEADERS)


@router.get("/")
def page() -> FileResponse:
    return _file("index.html")


@router.get("/web/{name}")
def page_file(name: str) -> FileResponse:
    return _file(name)
