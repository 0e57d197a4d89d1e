"""The queue contract on a real Redis: the senders' transport (make_celery(fail_fast=True)) sends the same messages
as kombu's own through one redis-py client, where kombu's builds a client per message."""

import json
import uuid

import pytest
import redis
from kombu.transport import redis as kombu_redis

from sepen_store.queue import SendingRedisTransport, enqueue, jobs_in_broker, make_celery
from sepen_store.settings import Settings
from tests.conftest import local_redis_url

REDIS_URL = local_redis_url(11)


@pytest.fixture
def broker():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def sent(broker, fail_fast: bool, monkeypatch) -> tuple[int, list[dict]]:
    """The redis-py clients the channel built to send 5 jobs (after a first one), and the messages in Redis."""
    built = []
    create = kombu_redis.Channel._create_client

    def counted(channel, *args, **kwargs):
        built.append(1)
        return create(channel, *args, **kwargs)

    monkeypatch.setattr(kombu_redis.Channel, "_create_client", counted)
    app = make_celery(Settings(broker_url=REDIS_URL), fail_fast=fail_fast)
    try:
        ids = {uuid.uuid4().hex for _ in range(6)}
        for n, job_id in enumerate(ids):
            if n == 1:
                built.clear()  # the first send made the channel (and ours, its client)
            enqueue(app, "generate", job_id)
        clients = len(built)
        assert jobs_in_broker(app, taken_within_s=60) == ids
    finally:
        app.close()
    messages = [json.loads(raw) for raw in broker.lrange("sepen.generate", 0, -1)]
    broker.flushdb()
    return clients, messages


def test_senders_send_the_same_messages_through_one_client(broker, monkeypatch):
    assert make_celery(Settings(broker_url=REDIS_URL), fail_fast=True).conf.broker_transport is SendingRedisTransport
    plain_clients, plain = sent(broker, False, monkeypatch)
    sender_clients, ours = sent(broker, True, monkeypatch)
    assert plain_clients == 5 and sender_clients == 0

    def shape(message: dict) -> dict:  # what differs between any two: ids, tags, the sender, the job id
        headers = {k: v for k, v in message["headers"].items() if k not in ("id", "root_id", "argsrepr")}
        varying = ("correlation_id", "delivery_tag", "reply_to")
        properties = {k: v for k, v in message["properties"].items() if k not in varying}
        return {**message, "body": None, "headers": headers, "properties": properties}

    assert [shape(m) for m in ours] == [shape(m) for m in plain]


def test_only_plain_redis_urls_get_the_senders_transport(tmp_path):
    """kombu picks rediss://'s TLS defaults by the scheme's name, which a transport class given by hand would skip."""
    assert make_celery(Settings(broker_url="rediss://127.0.0.1:6380/0"), fail_fast=True).conf.broker_transport is None
    assert make_celery(Settings(broker_url=REDIS_URL)).conf.broker_transport is None  # consumers: kombu's own
    assert make_celery(Settings(data_dir=tmp_path), fail_fast=True).conf.broker_transport is None  # embedded broker
