"""The deployment files hold together: compose parses offline and wires every service it promises,
and .env.example lists every setting the service reads."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sepen_store.settings import setting_names

ROOT = Path(__file__).resolve().parents[1]


def test_env_example_lists_every_setting():
    listed = set(re.findall(r"^(SEPEN_[A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert listed == setting_names()


def test_compose_services_and_their_wiring():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    assert "noeviction" in services["redis"]["command"]
    assert services["migrate"]["command"] == ["sepen-admin", "migrate"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["api"]["build"]["target"] == "api" and services["worker"]["build"]["target"] == "worker"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    for name in ("postgres", "redis", "api", "worker"):
        assert "healthcheck" in services[name], name
    settings = set(services["api"]["environment"])
    assert settings == setting_names() - {"SEPEN_DATA_DIR"}


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) is not installed")
def test_compose_file_validates_offline():
    run = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


def test_dockerfile_builds_a_torch_free_api_image():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM base AS api" in text and "FROM base AS worker" in text
    api_stage = text.split("FROM base AS api")[1].split("FROM base AS worker")[0]
    assert "pip install --no-deps ." in api_stage and "'torch' not in sys.modules" in api_stage
    assert ".[service]" not in api_stage


def test_every_relative_link_in_the_docs_resolves_inside_the_repository():
    """A clone has only the repository: a link to a file outside it (or to a missing one) is broken for users."""
    tracked = subprocess.run(["git", "ls-files", "*.md"], capture_output=True, text=True, cwd=ROOT, check=True)
    pages = [ROOT / name for name in tracked.stdout.split()]
    assert pages
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{page.relative_to(ROOT)} links outside the repository: {target}"
            assert resolved.exists(), f"{page.relative_to(ROOT)} links to a missing file: {target}"
