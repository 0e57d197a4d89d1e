"""The queue contract between gateway and workers: task names, queues, and the Celery app both build.

A message carries only the job id; the job row is the truth. Each kind of job has its own queue, so a long finetune
or evaluation never holds up image requests on a generate worker.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from celery import Celery
from kombu import Queue
from kombu.transport import redis as kombu_redis

from sepen_store.settings import Settings

log = logging.getLogger(__name__)
QUEUES = {"finetune": "sepen.finetune", "generate": "sepen.generate", "evaluate": "sepen.evaluate"}
TASKS = {"finetune": "sepen.run_finetune", "generate": "sepen.run_generate", "evaluate": "sepen.run_evaluate"}


def broker_settings(settings: Settings) -> tuple[str, dict]:
    if settings.embedded_broker:
        folder = (settings.data_dir / "broker").resolve()
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return "filesystem://", {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
        }
    # Short socket timeouts: a gateway whose broker is down must answer (the job is already stored), not hang.
    return settings.broker_url, {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
    }


class _SendingChannel(kombu_redis.Channel):
    """kombu's Redis channel, sending through one redis-py client of its own. kombu's builds a new client for every
    message it sends (copying redis-py's table of response callbacks each time): a third of send_task's CPU."""

    @contextmanager
    def conn_or_acquire(self, client=None):
        yield client or self._sending_client

    @cached_property
    def _sending_client(self):
        return self._create_client()


class SendingRedisTransport(kombu_redis.Transport):
    """The Redis transport of the senders (make_celery(fail_fast=True)): the same messages, a cheaper send."""

    Channel = _SendingChannel


def make_celery(settings: Settings, *, fail_fast: bool = False) -> Celery:
    """The Celery app of the contract. fail_fast (for senders: the gateway, the reconciler): one connection
    try, no kombu retry back-off (about 6 s), since the job row is already stored and is re-sent later; on a Redis
    broker (redis://), the SendingRedisTransport."""
    url, transport_options = broker_settings(settings)
    transport = None
    if fail_fast:
        transport_options = {**transport_options, "max_retries": 1, "interval_start": 0}
        if url.startswith("redis://"):  # not rediss://: kombu reads its TLS defaults from the scheme's name
            transport = SendingRedisTransport
    app = Celery("sepen", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport=transport,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(q) for q in QUEUES.values()],
        task_routes={TASKS[k]: {"queue": QUEUES[k]} for k in TASKS},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_heartbeat=0,
    )
    return app


def enqueue(app: Celery, kind: str, job_id: str) -> None:
    """Send a job's message; raises kombu/redis errors if the broker is down (the reconciler retries)."""
    app.send_task(TASKS[kind], args=[job_id], queue=QUEUES[kind], retry=False)


def jobs_in_broker(app: Celery, *, taken_within_s: float) -> set[str] | None:
    """The ids of jobs whose messages wait in the broker's queues, or were taken by a worker less than
    `taken_within_s` ago and not yet acknowledged; None when the broker cannot be inspected (a transport
    other than Redis or the embedded filesystem one). Raises the transport's errors when it is down."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        transport = connection.transport.driver_type
        if transport == "redis":
            messages = _redis_messages(channel, taken_within_s)
        elif transport == "filesystem":
            folder = Path(channel.data_folder_in)
            messages = [json.loads(path.read_bytes()) for path in folder.glob("*.msg") if path.is_file()]
        else:
            return None
    return {job_id for job_id in map(_job_of, messages) if job_id}


def _redis_messages(channel, taken_within_s: float) -> list[dict]:
    client = channel.client
    queued = [
        raw
        for queue in QUEUES.values()
        for key in dict.fromkeys(channel._q_for_pri(queue, pri) for pri in channel.priority_steps)
        for raw in client.lrange(key, 0, -1)
    ]
    recent = client.zrangebyscore(channel.unacked_index_key, time.time() - taken_within_s, "+inf")
    taken = [raw for raw in (client.hmget(channel.unacked_key, recent) if recent else []) if raw]
    return [json.loads(raw) for raw in queued] + [json.loads(raw)[0] for raw in taken]


def _job_of(message: dict) -> str | None:
    """The job id a Celery (protocol 2) message carries as its one argument."""
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (KeyError, ValueError, TypeError, IndexError):
        log.debug("a broker message that is not a sepen job: %.200r", message)
        return None
