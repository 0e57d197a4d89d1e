"""The object store (a SeaweedFS server of the test's own) stopped while a finetune finishes, with Postgres, Redis, the
gateway and a real `sepen-worker`: the finished weights wait in the worker and are published once the store is back
(one version, no failed job); meanwhile /readyz says the store is down and `?redirect=true` is answered 503 with
Retry-After, never a 307 to a store that does not answer."""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest

from tests.conftest import postgres_database
from tests.e2e.conftest import Deployment, RedisServer, free_port, service_env, wait_for_job, wait_until
from tests.seaweedfs import SeaweedFS

OUTAGE_S = 8


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with ExitStack() as stack:
        store = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
        store.start()
        stack.callback(store.stop)
        broker = RedisServer(tmp_path_factory.mktemp("redis"))
        broker.start()
        database = stack.enter_context(postgres_database("sepen_store_outage"))
        env = service_env(
            SEPEN_DATABASE_URL=database,
            SEPEN_BROKER_URL=broker.url,
            SEPEN_DATA_DIR=str(tmp_path_factory.mktemp("data")),
            **store.env(f"sepen-outage-{free_port()}"),
        )
        dep = Deployment("s3", env, f"http://127.0.0.1:{free_port()}", tmp_path_factory.mktemp("logs"), broker)
        stack.callback(dep.stop)
        dep.admin("migrate")
        dep.start_gateway()
        dep.start_worker()
        yield dep, store, dep.admin("create-key", "--tenant", "acme").split()[-1]


def test_a_store_outage_at_publish_keeps_the_finished_finetune(deployment):
    dep, store, key = deployment
    log = dep.logs / "worker-0.log"
    with dep.client(key) as client:
        image = client.post("/generate", json={"prompt": "a cat", "model": "sepen-tiny", "steps": 2}).json()
        assert wait_for_job(client, image["id"])["status"] == "succeeded"
        image_url = f"/jobs/{image['id']}/images/0"
        assert client.get(image_url, params={"redirect": "true"}).status_code == 307  # while the store answers

        body = {"adapter": "kept", "model": "sepen-tiny", "concepts": {"pairs": [["cat", "dog"]]}}
        response = client.post("/finetune", json={**body, "recipe": {"steps": 12}})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        def trained_to(step):
            progress = client.get(f"/jobs/{job_id}").json()["progress"]
            return progress is not None and progress["step"] >= step

        wait_until(lambda: trained_to(9), 240, "the finetune to reach step 9")
        store.stop()
        wait_until(lambda: "storage unreachable" in log.read_text(), 120, "the worker to wait for the store")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["storage"] == "unavailable", ready.text
        assert ready.json()["checks"]["database"] == "ok"
        redirect = client.get(image_url, params={"redirect": "true"})
        assert redirect.status_code == 503 and redirect.headers["Retry-After"], redirect.text
        assert redirect.json()["error"]["code"] == "storage_unavailable"
        assert "127.0.0.1" not in redirect.text
        time.sleep(OUTAGE_S)
        assert client.get(f"/jobs/{job_id}").json()["status"] == "running"  # waiting, not failed
        store.start()

        job = wait_for_job(client, job_id, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["result"]["adapter"] == "kept@1"
        assert [v["version"] for v in client.get("/adapters/kept").json()["versions"]] == [1]
        weights = client.get("/adapters/kept/1/weights")
        assert weights.status_code == 200 and len(weights.content) > 1000
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "/readyz to see the store again")
        assert client.get(image_url, params={"redirect": "true"}).status_code == 307
