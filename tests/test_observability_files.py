"""The metrics scrape example holds together: prometheus.yml scrapes the compose services on the ports they serve
metrics on, and the commented `prometheus` service of docker-compose.yml, uncommented, is valid compose that mounts
it."""

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deployment import COMPOSE, ROOT, compose_defaults, load_compose

PROMETHEUS = ROOT / "prometheus.yml"


def dns_targets(job: dict) -> list[tuple[str, int]]:
    return [(name, config["port"]) for config in job["dns_sd_configs"] for name in config["names"]]


def uncommented_prometheus_service() -> str:
    """docker-compose.yml with its commented prometheus service uncommented."""
    text = COMPOSE.read_text()
    block = re.search(r"^  # prometheus:\n(?:^  #   .*\n)+", text, re.M)
    assert block, "docker-compose.yml has no commented prometheus service"
    return text.replace(block.group(0), re.sub(r"^  # ", "  ", block.group(0), flags=re.M))


def test_prometheus_scrapes_the_api_and_every_worker_on_their_metrics_ports():
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    services = load_compose()["services"]
    api_port = int(services["api"]["command"][services["api"]["command"].index("--port") + 1])
    assert dns_targets(jobs["sepen-api"]) == [("api", api_port)]
    assert dns_targets(jobs["sepen-worker"]) == [
        ("worker", int(compose_defaults(COMPOSE)["SEPEN_WORKER_METRICS_PORT"]))
    ]
    assert (
        compose_defaults(COMPOSE)["SEPEN_WORKER_METRICS_HOST"] == "0.0.0.0"
    )  # reachable from the prometheus container
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())


def test_the_commented_prometheus_service_mounts_the_scrape_config(tmp_path):
    prometheus = yaml.safe_load(uncommented_prometheus_service())["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert set(prometheus["depends_on"]) == {"api", "worker"}
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (Debian package) is not installed")
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(uncommented_prometheus_service())
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    run = subprocess.run(
        [
            "docker-compose",
            "--env-file",
            str(empty_env),
            "--project-directory",
            str(ROOT),
            "-f",
            str(compose),
            "config",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert "prometheus" in yaml.safe_load(run.stdout)["services"]
