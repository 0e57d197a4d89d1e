"""Metrics and logs of real processes: the gateway under uvicorn (Postgres, a private Redis) and a `sepen-worker`
with its metrics port on loopback, both logging JSON. A submitted job shows in the queue depth and the queued
jobs, requests count under their route template (never a job id), the worker's counters and histograms show the
job it ran, and every log line parses as JSON, those written for the job carrying its id."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import postgres_database
from tests.e2e.conftest import BIN, ROOT, Deployment, RedisServer, free_port, service_env, wait_for_job, wait_until

JOB_ROUTE = "/jobs/{job_id}"


def scrape(url: str, **headers: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} of a Prometheus text page."""
    response = httpx.get(url, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def json_lines(path: Path) -> list[dict]:
    """Every line of a log, each of which must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name} is empty"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{path.name}: a line that is not JSON: {line!r}")
    assert all({"time", "level", "logger", "message", "process"} <= set(entry) for entry in parsed)
    return parsed


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """A gateway logging JSON at INFO (uvicorn's access lines too) on Postgres and a private Redis; no worker yet."""
    logs = tmp_path_factory.mktemp("logs-observability")
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    with postgres_database("sepen_obs") as database:
        env = service_env(
            SEPEN_DATABASE_URL=database,
            SEPEN_BROKER_URL=redis.url,
            SEPEN_DATA_DIR=str(tmp_path_factory.mktemp("data")),
            SEPEN_LOG_FORMAT="json",
        )
        port = free_port()
        dep = Deployment("servers", env, f"http://127.0.0.1:{port}", logs, redis)
        try:
            dep.admin("migrate")
            dep.gateway = subprocess.Popen(
                [str(BIN / "uvicorn"), "--factory", "service.app:app_from_env", "--host", "127.0.0.1"]
                + ["--port", str(port), "--log-level", "info"],
                env=env,
                cwd=ROOT,
                stdout=(logs / "gateway.log").open("w"),
                stderr=subprocess.STDOUT,
            )
            wait_until(lambda: httpx.get(f"{dep.base_url}/healthz", timeout=1).status_code == 200, 60, "the gateway")
            yield dep
        finally:
            dep.stop()


def test_gateway_and_worker_metrics_follow_a_job_and_logs_are_json(observed):
    dep = observed
    key = dep.admin("create-key", "--tenant", "acme").split()[-1]
    client = dep.client(key)
    metrics_url = f"{dep.base_url}/metrics"
    before = scrape(metrics_url)
    assert sample(before, "sepen_metrics_source_up", source="database") == 1
    assert sample(before, "sepen_metrics_source_up", source="broker") == 1
    assert sample(before, "sepen_jobs", kind="generate", status="queued") == 0
    assert ("sepen_queue_depth", frozenset({"queue": "sepen.generate"}.items())) in before

    submitted = client.post(
        "/generate",
        json={"prompt": "a cat and a dog", "model": "sepen-tiny", "steps": 2, "images": 1, "seed": 3},
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    for _ in range(2):
        assert client.get(f"/jobs/{job_id}").status_code == 200
    queued = scrape(metrics_url)
    assert sample(queued, "sepen_queue_depth", queue="sepen.generate") == 1  # no worker yet: it waits in Redis
    assert sample(queued, "sepen_queue_depth", queue="sepen.finetune") == 0
    assert sample(queued, "sepen_jobs", kind="generate", status="queued") == 1
    ok = {"method": "GET", "route": JOB_ROUTE, "status": "200"}
    assert sample(queued, "sepen_http_requests_total", **ok) - sample(before, "sepen_http_requests_total", **ok) == 2
    assert sample(queued, "sepen_http_request_duration_seconds_count", **ok) == 2
    posted = {"method": "POST", "route": "/generate", "status": "202"}
    assert sample(queued, "sepen_http_requests_total", **posted) == 1
    assert job_id not in httpx.get(metrics_url).text  # routes by template: no job id in any label

    worker_port = free_port()
    dep.start_worker(SEPEN_WORKER_METRICS_PORT=str(worker_port), SEPEN_WORKER_METRICS_HOST="127.0.0.1")
    assert wait_for_job(client, job_id, timeout=120)["status"] == "succeeded"
    worker_url = f"http://127.0.0.1:{worker_port}/metrics"
    finished = {"kind": "generate", "status": "succeeded"}
    worker = wait_until(
        lambda: (s := scrape(worker_url)) and sample(s, "sepen_worker_jobs_finished_total", **finished) == 1 and s,
        20,
        "the worker to count the job",
    )
    assert sample(worker, "sepen_worker_job_duration_seconds_count", **finished) == 1
    assert 0 < sample(worker, "sepen_worker_job_duration_seconds_sum", **finished) < 120
    assert sample(worker, "sepen_worker_cache_misses_total", cache="model") == 1  # loaded for this first job
    assert sample(worker, "sepen_worker_jobs_finished_total", kind="generate", status="failed") == 0

    after = scrape(metrics_url)
    assert sample(after, "sepen_queue_depth", queue="sepen.generate") == 0
    assert sample(after, "sepen_jobs", kind="generate", status="queued") == 0
    assert sample(after, "sepen_jobs", kind="generate", status="succeeded") == 1

    worker_lines = json_lines(dep.logs / "worker-0.log")
    for_job = [line for line in worker_lines if line.get("job_id") == job_id]
    assert any("claimed" in line["message"] for line in for_job), worker_lines[-10:]
    assert any("succeeded after" in line["message"] for line in for_job), worker_lines[-10:]
    assert all(line["process"] in ("worker", "job process") for line in worker_lines)
    gateway_lines = json_lines(dep.logs / "gateway.log")
    assert any(f"/jobs/{job_id}" in line["message"] and line["logger"] == "uvicorn.access" for line in gateway_lines)


def test_a_metrics_token_guards_the_gateway_page(tmp_path):
    """With SEPEN_METRICS_TOKEN set, /metrics asks for it (the one error shape, WWW-Authenticate) and the other
    open routes stay open; the embedded mode counts its filesystem broker's messages."""
    env = service_env(SEPEN_DATA_DIR=str(tmp_path), SEPEN_METRICS_TOKEN="s3cret-scrape-token")
    dep = Deployment("embedded", env, f"http://127.0.0.1:{free_port()}", tmp_path)
    try:
        dep.admin("migrate")
        dep.start_gateway()
        refused = httpx.get(f"{dep.base_url}/metrics", timeout=10)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["code"] == "unauthorized"
        wrong = httpx.get(f"{dep.base_url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        key = dep.admin("create-key", "--tenant", "acme").split()[-1]
        job = dep.client(key).post("/generate", json={"prompt": "a cat", "model": "sepen-tiny", "steps": 2})
        assert job.status_code == 202, job.text
        samples = scrape(f"{dep.base_url}/metrics", Authorization="Bearer s3cret-scrape-token")
        assert sample(samples, "sepen_queue_depth", queue="sepen.generate") == 1
        assert sample(samples, "sepen_jobs", kind="generate", status="queued") == 1
        assert sample(samples, "sepen_http_requests_total", method="GET", route="/metrics", status="401") == 2
        assert httpx.get(f"{dep.base_url}/healthz", timeout=10).status_code == 200
    finally:
        dep.stop()
