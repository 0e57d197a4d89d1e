"""The web page in a real browser: Debian's Chromium, headless, driven by Playwright, against the embedded service (the
gateway under uvicorn and a `sepen-worker`, an SQLite file and a filesystem broker, the bundled toy model) on a free
loopback port. No Chromium is a failure, not a skip: `.ci/run` installs it (`apt-get install chromium`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import Deployment, free_port, service_env

CHROMIUM = os.environ.get("SEPEN_TEST_CHROMIUM", "/usr/bin/chromium")
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        # Debian's build, never a browser Playwright downloads (`playwright install` is not used).
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The embedded default as `scripts/start` runs it: one gateway, one worker, its own data directory."""
    logs = tmp_path_factory.mktemp("web-logs")
    env = service_env(SEPEN_DATA_DIR=str(tmp_path_factory.mktemp("web-data")))
    deployment = Deployment("embedded", env, f"http://127.0.0.1:{free_port()}", logs)
    try:
        deployment.admin("migrate")
        deployment.start_gateway()
        deployment.start_worker()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def api_key(service) -> str:
    return service.admin("create-key", "--tenant", "web", "--name", "browser").split()[-1]


class PageErrors:
    """What went wrong inside the page: uncaught exceptions, console errors and a failed load of one of the page's
    own files. The API's error answers are no failure here (the page shows them; the tests check how), and neither
    is the browser's console line for each."""

    def __init__(self, page, origin: str):
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", self._console)
        page.on("response", lambda response: self._response(response, origin))

    def _console(self, message) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {message.text}")

    def _response(self, response, origin: str) -> None:
        path = response.url.removeprefix(origin)
        if response.status >= 400 and (path == "/" or path.startswith("/web/")):
            self.errors.append(f"{response.status} for the page's own {path}")


@pytest.fixture
def page(browser, service):
    """A fresh browser context (its own session storage) at desktop size, on the service's origin; fails the test
    on an uncaught exception or an unexpected console error in the page."""
    context = browser.new_context(viewport=DESKTOP, base_url=service.base_url, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors = PageErrors(page, service.base_url)
    yield page
    context.close()
    assert not errors.errors, errors.errors


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where screenshots go: docs/web/ when SEPEN_WEB_SCREENSHOTS=1 (to refresh the README's), else a temp dir."""
    if os.environ.get("SEPEN_WEB_SCREENSHOTS") == "1":
        return Path(__file__).resolve().parents[2] / "docs" / "web"
    return tmp_path
