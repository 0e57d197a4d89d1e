"""A bounded schema-driven fuzz run (schemathesis) against the real gateway: uvicorn on a loopback port with a
fresh Postgres database and Redis db 13, every operation of its own OpenAPI document, about two minutes.
No answer may be a 5xx, and every answer must match what the document says: its status, content type, body
schema and headers. FUZZ_SECONDS sets the budget; docs/api-fuzzing.md has the longer run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from sepen_store.auth import create_api_key
from sepen_store.database import make_engine, session_factory
from sepen_store.job_outputs import replace_images
from sepen_store.jobs import claim_job, create_job, finish_job
from sepen_store.registry import publish_version
from tests.conftest import local_redis_url, postgres_database
from tests.e2e.conftest import free_port, launch_gateway

BIN = Path(sys.executable).parent
FUZZ_REDIS_URL = local_redis_url(13)
FUZZ_SECONDS = int(os.environ.get("FUZZ_SECONDS", "100"))
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"
ACCESS_LINE = re.compile(r'"(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS|TRACE) [^"]*" (\d{3})')


def _seed(url: str) -> str:
    """An API key, and something for it to find: an adapter version and a finished generate job with images."""
    engine = make_engine(url)
    with session_factory(engine)() as session:
        key = create_api_key(session, "fuzz", "fuzzing")
        finetune, _ = create_job(session, "fuzz", "finetune", {"seeded": True})
        publish_version(
            session,
            tenant="fuzz",
            name="cat-dog",
            job_id=finetune.id,
            data=b"safetensors bytes",
            base_model="sepen-tiny",
            base_fingerprint="f" * 64,
            sha256="0" * 64,
            metadata={"concepts": [["cat", "dog"]]},
        )
        job, _ = create_job(session, "fuzz", "generate", {"seeded": True})
        claim = claim_job(session, job.id, "seed", lease_s=60)
        replace_images(session, job.id, [("image", 0, PNG), ("heatmap", 0, PNG)])
        image = {"index": 0, "seed": 1, "heatmap": True, "scores": None}
        result = {"images": [image], "adapter": None, "model": "sepen-tiny", "concepts": [], "sample": {}}
        finish_job(session, claim, "succeeded", result=result)
    engine.dispose()
    return key


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(base URL, API key, access log) of a gateway under uvicorn, its own database and Redis db."""
    client = redis.Redis.from_url(FUZZ_REDIS_URL, socket_connect_timeout=3)
    client.flushdb()
    logs = tmp_path_factory.mktemp("fuzz")
    with postgres_database("sepen_fuzz") as url:
        key = _seed(url)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEPEN_")}
        env.update(
            SEPEN_DATABASE_URL=url,
            SEPEN_BROKER_URL=FUZZ_REDIS_URL,
            SEPEN_DATA_DIR=str(logs / "data"),
            SEPEN_MODELS="sepen-tiny=tiny,sepen-toy=toy",
            # High enough that the fuzzer reaches the logic behind the limit; the headers are still sent.
            SEPEN_RATE_LIMIT_PER_MINUTE="1000000",
            # Streams of jobs no worker runs end soon (a request of the fuzzer waits for the end of its answer), and
            # webhooks are allowed, so that the fuzzer reaches the checks of their URLs.
            SEPEN_EVENTS_MAX_STREAM_S="2",
            SEPEN_EVENTS_HEARTBEAT_S="1",
            SEPEN_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
            OMP_NUM_THREADS="1",
        )
        log_path = logs / "gateway.log"
        process = launch_gateway(env, port, log_path, log_level="info")
        try:
            yield f"http://127.0.0.1:{port}", key, log_path
        finally:
            process.terminate()
            process.wait(15)
    client.flushdb()
    client.close()


def test_schema_driven_fuzzing_finds_no_failure(gateway, tmp_path):
    base_url, key, log_path = gateway
    report = tmp_path / "schemathesis.json"
    started = time.monotonic()
    run = subprocess.run(
        [str(BIN / "schemathesis"), "run", f"{base_url}/openapi.json", "--checks", ",".join(CHECKS)]
        + ["--header", f"Authorization: Bearer {key}", "--max-time", str(FUZZ_SECONDS), "--seed", "7"]
        + ["--workers", "1", "--report", "json", "--report-json-path", str(report)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=FUZZ_SECONDS + 120,
    )
    duration = time.monotonic() - started
    summary = json.loads(report.read_text())
    statuses = Counter(int(code) for code in ACCESS_LINE.findall(log_path.read_text()))
    requests = sum(statuses.values())
    cases = summary["test_cases"]
    print(
        f"fuzz run: {requests} requests, {cases['generated']} test cases, {cases['with_failures']} with failures, "
        f"{duration:.0f} s; statuses {dict(sorted(statuses.items()))}"
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert summary["failures"] == [] and summary["errors"] == [], run.stdout[-6000:]
    assert summary["operations"]["tested"] == summary["operations"]["total"] == 17
    assert requests > 1000, "the run was too short to mean much"
    assert not [status for status in statuses if status >= 500], statuses
