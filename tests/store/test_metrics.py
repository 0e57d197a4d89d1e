"""What the gateway's /metrics reads: jobs by kind and status on both database backends, and the messages waiting
in each queue of a real Redis (priority sub-queues counted, taken messages not) and of the embedded broker."""

import uuid

import pytest
import redis
from kombu.exceptions import OperationalError

from sepen_store.jobs import STATUSES, claim_job, create_job
from sepen_store.metrics import job_counts, queue_depths
from sepen_store.queue import QUEUES, enqueue, make_celery
from sepen_store.settings import Settings
from tests.conftest import local_redis_url

REDIS_URL = local_redis_url(11)


def test_job_counts_list_every_kind_and_status(sessions):
    with sessions() as session:
        before = job_counts(session)
        assert set(before) == {(kind, status) for kind in QUEUES for status in STATUSES}
        ids = [create_job(session, "acme", "generate", {"n": uuid.uuid4().hex})[0].id for _ in range(3)]
        create_job(session, "globex", "finetune", {"n": uuid.uuid4().hex})
        claim_job(session, ids[0], "w1", lease_s=60)
        after = job_counts(session)
    changes = {key: after[key] - before[key] for key in after if after[key] != before[key]}
    assert changes == {("generate", "queued"): 2, ("generate", "running"): 1, ("finetune", "queued"): 1}


@pytest.fixture
def redis_broker():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    client.flushdb()
    app = make_celery(Settings(broker_url=REDIS_URL))
    yield app, client
    app.close()
    client.flushdb()
    client.close()


def test_redis_queue_depths_count_priority_sub_queues_and_not_taken_messages(redis_broker):
    app, client = redis_broker
    assert queue_depths(app) == {"sepen.finetune": 0, "sepen.generate": 0, "sepen.evaluate": 0}
    for _ in range(3):
        enqueue(app, "generate", uuid.uuid4().hex)
    enqueue(app, "finetune", uuid.uuid4().hex)
    app.send_task("sepen.run_generate", args=[uuid.uuid4().hex], queue="sepen.generate", priority=5)
    assert any(key != b"sepen.generate" and key.startswith(b"sepen.generate") for key in client.keys("sepen.*"))
    assert queue_depths(app) == {"sepen.finetune": 1, "sepen.generate": 4, "sepen.evaluate": 0}
    client.lpop("sepen.generate")  # what a worker's fetch does
    assert queue_depths(app)["sepen.generate"] == 3


def test_embedded_queue_depths_count_the_broker_folders_files(tmp_path):
    app = make_celery(Settings(data_dir=tmp_path))
    assert queue_depths(app) == {"sepen.finetune": 0, "sepen.generate": 0, "sepen.evaluate": 0}
    for kind in ("generate", "generate", "finetune"):
        enqueue(app, kind, uuid.uuid4().hex)
    assert queue_depths(app) == {"sepen.finetune": 1, "sepen.generate": 2, "sepen.evaluate": 0}
    app.close()


def test_a_broker_that_is_down_raises():
    app = make_celery(Settings(broker_url="redis://127.0.0.1:6390/0"), fail_fast=True)
    with pytest.raises(OperationalError):  # what availability.outage_of reads as the broker being down
        queue_depths(app)
    app.close()
