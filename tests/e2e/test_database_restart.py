"""Postgres stopped and restarted under a running job (a server of the test's own, tests/postgres_server.py), with
the gateway, Redis and a real `sepen-worker`: the job rides the outage out and ends with its own result, and the
mixed jobs of two tenants that follow each end with a result of their own kind, tenant and request. No answer is a
5xx once the database is back, and no job's error names a driver, host or port."""

from __future__ import annotations

import time
from contextlib import ExitStack

import httpx
import pytest

from tests.e2e.conftest import Deployment, RedisServer, free_port, service_env, wait_for_job, wait_until
from tests.postgres_server import PostgresServer

OUTAGE_S = 12
INFRASTRUCTURE_WORDS = ("psycopg", "sqlalchemy", "127.0.0.1", "localhost", "port ", "connection", "OperationalError")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with ExitStack() as stack:
        server = PostgresServer()
        stack.callback(server.remove)
        server.start()
        broker = RedisServer(tmp_path_factory.mktemp("redis"))
        broker.start()
        env = service_env(
            SEPEN_DATABASE_URL=server.url,
            SEPEN_BROKER_URL=broker.url,
            SEPEN_DATA_DIR=str(tmp_path_factory.mktemp("data")),
            SEPEN_MODELS="sepen-toy=toy,sepen-tiny=tiny",
            SEPEN_GENERATE_BATCH_JOBS="1",  # one job per batch: each message's job is the one whose result is checked
        )
        dep = Deployment("servers", env, f"http://127.0.0.1:{free_port()}", tmp_path_factory.mktemp("logs"), broker)
        stack.callback(dep.stop)
        dep.admin("migrate")
        dep.start_gateway()
        dep.start_worker()
        keys = {tenant: dep.admin("create-key", "--tenant", tenant).split()[-1] for tenant in ("acme", "globex")}
        yield dep, server, keys


def submit(client: httpx.Client, path: str, body: dict) -> str:
    response = client.post(path, json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def generate(prompt: str, seed: int, **more) -> dict:
    return {"prompt": prompt, "model": "sepen-tiny", "seed": seed, **more}


def finetune(adapter: str, pair: list[str], steps: int) -> dict:
    return {"adapter": adapter, "model": "sepen-tiny", "concepts": {"pairs": [pair]}, "recipe": {"steps": steps}}


def restart_database_when(server: PostgresServer, client: httpx.Client, job_id: str, step: int) -> None:
    """Stop Postgres once the job has reported `step`, keep it down OUTAGE_S, start it again."""

    def reached():
        progress = client.get(f"/jobs/{job_id}").json()["progress"]
        return progress is not None and progress["step"] >= step

    wait_until(reached, 180, f"job {job_id} to report step {step}")
    server.stop()
    time.sleep(OUTAGE_S)
    server.start()


def assert_own_result(client: httpx.Client, job_id: str, kind: str, body: dict) -> dict:
    """The job succeeded with a result of its own kind made for its own request, and the other tenant cannot see it."""
    job = wait_for_job(client, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    assert job["kind"] == kind and job["error"] is None
    result = job["result"]
    if kind == "generate":
        assert len(result["images"]) == body.get("images", 1), result
        assert [image["seed"] for image in result["images"]] == [body["seed"] + i for i in range(len(result["images"]))]
        assert job["progress"] == {"step": body["steps"], "total": body["steps"]}
    else:
        assert result["name"] == body["adapter"] and result["adapter"] == f"{body['adapter']}@{result['version']}"
        assert job["progress"]["step"] == job["progress"]["total"] == body["recipe"]["steps"]
    return job


def test_a_database_restart_under_a_generate_with_mixed_jobs_of_two_tenants_queued_behind_it(deployment):
    dep, server, keys = deployment
    with dep.client(keys["acme"]) as acme, dep.client(keys["globex"]) as globex:
        long_body = generate("a cat and a dog", 11, steps=150, images=2)
        long = submit(acme, "/generate", long_body)
        # Jobs of both tenants and all kinds wait behind it while the database goes away: each must get its own answer.
        plan = [
            (globex, "finetune", finetune("globex-pair", ["cat", "dog"], 6)),
            (acme, "generate", generate("a photo of a cat", 21, steps=3)),
            (acme, "finetune", finetune("acme-pair", ["apple", "car"], 4)),
            (globex, "generate", generate("a photo of a dog", 31, steps=5, images=3)),
            (acme, "generate", generate("a photo of a car", 41, steps=4, images=2)),
        ]
        jobs = [(client, kind, body, submit(client, f"/{kind}", body)) for client, kind, body in plan]
        restart_database_when(server, acme, long, step=2)
        started = time.monotonic()
        assert_own_result(acme, long, "generate", long_body)
        for client, kind, body, job_id in jobs:
            assert_own_result(client, job_id, kind, body)
            other = globex if client is acme else acme
            assert other.get(f"/jobs/{job_id}").status_code == 404
        assert acme.get("/adapters/acme-pair").status_code == 200
        assert globex.get("/adapters/acme-pair").status_code == 404
        assert [v["version"] for v in globex.get("/adapters/globex-pair").json()["versions"]] == [1]
    log = (dep.logs / "worker-0.log").read_text()
    assert "database unreachable" in log, "the outage was not seen by the worker: the test proved nothing"
    assert "Traceback" not in log, log[-3000:]
    print(f"after the restart, the generate and 5 mixed jobs took {time.monotonic() - started:.0f} s")


def test_a_database_restart_under_a_finetune_keeps_it_and_its_one_version(deployment):
    dep, server, keys = deployment
    with dep.client(keys["globex"]) as globex:
        body = finetune("restarted", ["cat", "dog"], 40)
        job_id = submit(globex, "/finetune", body)
        restart_database_when(server, globex, job_id, step=3)
        job = assert_own_result(globex, job_id, "finetune", body)
        assert job["result"]["version"] == 1
        versions = globex.get("/adapters/restarted").json()["versions"]
        assert [v["version"] for v in versions] == [1]
        # The jobs listed during all this: none failed, none carries infrastructure text.
        for listed in globex.get("/jobs", params={"limit": 100}).json()["jobs"]:
            assert listed["status"] == "succeeded", listed
            assert not any(word in str(listed["error"]) for word in INFRASTRUCTURE_WORDS)
