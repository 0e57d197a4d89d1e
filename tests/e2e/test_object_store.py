"""The service with SEPEN_BLOB_BACKEND=s3, end to end: Postgres, a private Redis, a SeaweedFS S3 server (all on
loopback), `sepen-admin migrate` (which makes the bucket), the gateway and a `sepen-worker`. Downloads answer as with
the database backend, `?redirect=true` answers with a presigned URL of the bucket, the bytes live in the bucket, and
`sepen-admin retention` deletes images but never adapters."""

import io
import subprocess
from contextlib import ExitStack

import httpx
import pytest
from PIL import Image

from sepen_core.adapters import KeyProjectionAdapter
from tests.conftest import postgres_database
from tests.e2e.conftest import BIN, ROOT, Deployment, RedisServer, free_port, service_env, wait_for_job


@pytest.fixture(scope="module")
def s3_deployment(tmp_path_factory, s3_server):
    bucket = f"sepen-e2e-{free_port()}"  # made by `sepen-admin migrate`, not by the test
    stack = ExitStack()
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    database = stack.enter_context(postgres_database("sepen_e2e_s3"))
    env = service_env(
        SEPEN_DATABASE_URL=database,
        SEPEN_BROKER_URL=redis.url,
        SEPEN_DATA_DIR=str(tmp_path_factory.mktemp("data")),
        **s3_server.env(bucket),
    )
    dep = Deployment("s3", env, f"http://127.0.0.1:{free_port()}", tmp_path_factory.mktemp("logs-s3"), redis)
    with stack:
        try:
            dep.admin("migrate")
            dep.start_gateway()
            dep.start_worker()
            yield dep, bucket
        finally:
            dep.stop()


def test_generate_finetune_and_downloads_with_the_s3_backend(s3_deployment, s3_server):
    dep, bucket = s3_deployment
    assert s3_server.keys(bucket) == []  # migrate made the bucket
    key = dep.admin("create-key", "--tenant", "acme").split()[-1]
    with dep.client(key) as client:
        response = client.post(
            "/finetune",
            json={
                "adapter": "cat-dog",
                "model": "sepen-tiny",
                "concepts": {"pairs": [["cat", "dog"]]},
                "recipe": {"steps": 6, "batch_size": 1},
            },
        )
        assert response.status_code == 202, response.text
        finetune = wait_for_job(client, response.json()["id"])
        assert finetune["status"] == "succeeded", finetune
        response = client.post(
            "/generate",
            json={"prompt": "a photo of a cat and a dog", "model": "sepen-tiny", "adapter": "cat-dog@1", "seed": 3},
        )
        assert response.status_code == 202, response.text
        generate = wait_for_job(client, response.json()["id"])
        assert generate["status"] == "succeeded", generate
        job_id = generate["id"]

        keys = s3_server.keys(bucket)
        image_keys = [k for k in keys if k.startswith(f"images/{job_id}/")]
        adapter_keys = [k for k in keys if k.startswith("adapters/")]
        assert len(image_keys) == 1 and len(adapter_keys) == 1 and len(keys) == 2  # the checkpoint is gone
        stored = s3_server.client().get_object(Bucket=bucket, Key=image_keys[0])["Body"].read()

        image = client.get(f"/jobs/{job_id}/images/0")  # as with the database backend: the bytes, from the gateway
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content == stored and Image.open(io.BytesIO(image.content)).text["seed"] == "3"
        assert (
            client.get(f"/jobs/{job_id}/images/0", headers={"If-None-Match": image.headers["etag"]}).status_code == 304
        )

        moved = client.get(f"/jobs/{job_id}/images/0", params={"redirect": "true"})
        assert moved.status_code == 307 and moved.headers["etag"] == image.headers["etag"]
        assert (
            moved.headers["location"].startswith(s3_server.endpoint_url)
            and "no-store" in moved.headers["cache-control"]
        )
        direct = httpx.get(moved.headers["location"])  # no API key: the URL is the permission
        assert direct.status_code == 200 and direct.content == stored and direct.headers["content-type"] == "image/png"

        weights = client.get("/adapters/cat-dog/1/weights")
        assert weights.status_code == 200
        assert KeyProjectionAdapter.from_bytes(weights.content).sha256 == finetune["result"]["sha256"]
        moved = client.get("/adapters/cat-dog/1/weights", params={"redirect": "true"})
        assert moved.status_code == 307
        direct = httpx.get(moved.headers["location"])
        assert direct.content == weights.content
        assert direct.headers["content-disposition"] == weights.headers["content-disposition"]
        exported = client.get("/adapters/cat-dog/1/weights", params={"redirect": "true", "format": "kohya"})
        assert exported.status_code == 200 and exported.content  # an export is made by the gateway

        # Retention, as an operator runs it now (the workers run it every SEPEN_RETENTION_INTERVAL_S).
        retention = subprocess.run(
            [str(BIN / "sepen-admin"), "retention"],
            env={**dep.env, "SEPEN_IMAGE_RETENTION_DAYS": "0.000001"},  # a tenth of a second
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert retention.returncode == 0 and "deleted 1 image(s)" in retention.stderr, retention.stderr
        gone = client.get(f"/jobs/{job_id}/images/0")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "image_not_found"
        assert s3_server.keys(bucket) == adapter_keys  # the adapter stays
        assert client.get("/adapters/cat-dog/1/weights").content == weights.content
        assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
