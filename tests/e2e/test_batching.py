"""Mixed-adapter batches with the real parts (Postgres, Redis, Celery workers with their job processes): generate
jobs with different adapters that wait in the queue run as one batch when a generate worker starts, and each job's
images are the ones a worker running one job at a time makes."""

import io

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from tests.conftest import postgres_database
from tests.e2e.conftest import Deployment, RedisServer, free_port, service_env, wait_for_job

RECIPE = {"steps": 3, "batch_size": 2, "learning_rate": 0.05, "normalization": "content"}
# Different adapters, prompts, seeds, image counts, guidance scales and negative prompts; the same model, size, steps.
REQUESTS = [
    {"adapter": "red@1", "images": 2, "seed": 0},
    {"adapter": "blue@1", "seed": 5, "prompt": "a dog and a cat"},
    {"seed": 9, "negative_prompt": "blurry"},
    {"adapter": "red@1", "seed": 3, "guidance": 3.0},
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Gateway, Postgres and Redis, and a finetune-only worker: generate jobs wait in the queue until a test starts
    a generate worker."""
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    with postgres_database("sepen_batch") as database:
        env = service_env(
            SEPEN_DATABASE_URL=database, SEPEN_BROKER_URL=redis.url, SEPEN_DATA_DIR=str(tmp_path_factory.mktemp("data"))
        )
        dep = Deployment("servers", env, f"http://127.0.0.1:{free_port()}", tmp_path_factory.mktemp("logs"), redis)
        try:
            dep.admin("migrate")
            dep.start_gateway()
            dep.start_worker("finetune")
            yield dep
        finally:
            dep.stop()


@pytest.fixture(scope="module")
def key(servers) -> str:
    return servers.admin("create-key", "--tenant", "acme", "--name", "batching").split()[-1]


def submit_all(client) -> list[str]:
    ids = []
    for extra in REQUESTS:
        body = {"prompt": "a cat and a dog", "model": "sepen-tiny", "steps": 3, **extra}
        response = client.post("/generate", json=body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def claim_tokens(dep: Deployment, ids: list[str]) -> list[str]:
    """Which claim ran each job (the worker column: worker id and a token per claim, shared by one batch)."""
    engine = create_engine(dep.env["SEPEN_DATABASE_URL"])
    with engine.connect() as connection:
        rows = dict(connection.execute(text("SELECT id, worker FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}).all())
    engine.dispose()
    return [rows[i] for i in ids]


def images_of(client, job: dict) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(client.get(image["url"]).content)), dtype=np.int16)
        for image in job["result"]["images"]
    ]


def test_queued_jobs_with_different_adapters_run_as_one_batch(servers, key):
    dep = servers
    with dep.client(key) as client:
        for name in ("red", "blue"):
            recipe = {**RECIPE, "seed": len(name)}  # two different adapters
            body = {"adapter": name, "model": "sepen-tiny", "concepts": {"pairs": [["cat", "dog"]]}, "recipe": recipe}
            job = client.post("/finetune", json=body).json()
            assert wait_for_job(client, job["id"])["status"] == "succeeded"

        batched_ids = submit_all(client)
        assert all(client.get(f"/jobs/{i}").json()["status"] == "queued" for i in batched_ids)
        worker = dep.start_worker("generate")
        batched = [wait_for_job(client, i) for i in batched_ids]
        assert [j["status"] for j in batched] == ["succeeded"] * len(REQUESTS), batched
        assert len(set(claim_tokens(dep, batched_ids))) == 1  # one claim, one batch
        worker.terminate()
        worker.wait(30)

        alone_ids = submit_all(client)
        dep.start_worker("generate", SEPEN_GENERATE_BATCH_JOBS="1")
        alone = [wait_for_job(client, i) for i in alone_ids]
        assert len(set(claim_tokens(dep, alone_ids))) == len(REQUESTS)  # one claim per job
        for ours, theirs in zip(batched, alone, strict=True):
            assert ours["result"]["sample"] == theirs["result"]["sample"]
            for a, b in zip(images_of(client, ours), images_of(client, theirs), strict=True):
                assert np.abs(a - b).max() <= 1
        # The adapters change the images, so the comparison above can fail.
        red, plain = images_of(client, batched[0])[0], images_of(client, batched[2])[0]
        assert np.abs(red - plain).max() > 10
