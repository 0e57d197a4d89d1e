"""Job events in Redis: each write that changes a job's status or progress publishes its JobEvent to a capped stream
per job, so that a gateway streams a job's events to its clients without reading the database per client.

The job row stays the truth: an event is published after its row committed, and a reader starts from the row
(GET /jobs/{id}/events sends the job as it is first). A stream keeps the last STREAM_MAXLEN events of its job for a
day: enough for a client that reconnects with Last-Event-ID to catch up, and a client further behind gets the row.
Without a Redis broker (the embedded mode) nothing is published and readers poll the row.

A process that writes job rows publishes through the session factory it writes with: `session_factory(engine,
events=EventPublisher(url))` puts the publisher in every session's `info`, and sepen_store.jobs publishes after each
commit that made an event.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
import redis.asyncio
from sqlalchemy.orm import Session

from sepen_store.contract import EventError, JobEvent, event_result
from sepen_store.rate_limits import shared_counter_url
from sepen_store.tables import Job, utcnow

log = logging.getLogger(__name__)

STREAM_PREFIX = "sepen:job-events:"
STREAM_MAXLEN = 200  # about three minutes of a running job's progress at one report a second
STREAM_TTL_S = 86_400
SESSION_INFO_KEY = "sepen_job_events"
REDIS_TIMEOUT_S = 1.0
REDIS_RETRY_S = 5.0  # after a failed publish, publish nothing for this long (the readers fall back to the row)


def stream_key(job_id: str) -> str:
    return f"{STREAM_PREFIX}{job_id}"


def events_url(broker_url: str) -> str | None:
    """The broker's URL when it is a Redis that gateways and workers share; None in the embedded mode."""
    return shared_counter_url(broker_url)


def event_of(job: Job) -> JobEvent:
    """The job as it is, as the `status` event a stream starts with."""
    error = EventError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobEvent(
        seq=job.event_seq,
        type="status",
        job_id=job.id,
        kind=job.kind,
        status=job.status,
        at=utcnow(),
        progress=job.progress,
        result=event_result(job.kind, job.result),
        error=error,
    )


class EventPublisher:
    """Publishes job events to their streams; a Redis that does not answer is logged, never raised: the job row
    has already changed, and the readers find the change there."""

    def __init__(self, redis_url: str):
        self.redis = redis.Redis.from_url(
            redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
        )
        self._down_until = 0.0

    def publish(self, event: JobEvent) -> None:
        if time.monotonic() < self._down_until:
            return
        key = stream_key(event.job_id)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(key, {"data": event.model_dump_json()}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.expire(key, STREAM_TTL_S)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("job events: Redis unavailable (%s); not publishing for %.0f s", exc, REDIS_RETRY_S)
            self._down_until = time.monotonic() + REDIS_RETRY_S

    def close(self) -> None:
        self.redis.close()


def publisher_for(broker_url: str) -> EventPublisher | None:
    url = events_url(broker_url)
    return EventPublisher(url) if url else None


def publish(session: Session, event: JobEvent) -> None:
    """Publish through the publisher of the session's factory, if it has one (call after the commit)."""
    publisher = session.info.get(SESSION_INFO_KEY)
    if publisher is not None:
        publisher.publish(event)


@dataclass(frozen=True)
class StreamedEvent:
    stream_id: str  # Redis's id of the entry: where the next read starts
    event: JobEvent


class EventReader:
    """A gateway's reader of one job's stream (asyncio): what it holds now, then what comes, waiting in Redis."""

    def __init__(self, redis_url: str, job_id: str):
        self.key = stream_key(job_id)
        # No socket timeout: a read blocks in Redis for up to its block_ms (a quiet job), not in the socket.
        self.redis = redis.asyncio.Redis.from_url(redis_url, socket_connect_timeout=REDIS_TIMEOUT_S)

    async def held(self) -> list[StreamedEvent]:
        """The events the stream holds now, oldest first (at most STREAM_MAXLEN or so)."""
        return [self._parse(entry) for entry in await self.redis.xrange(self.key)]

    async def after(self, stream_id: str, block_ms: int) -> list[StreamedEvent]:
        """The events added after `stream_id` ('0-0': from the start), waiting up to block_ms for one."""
        answer = await self.redis.xread({self.key: stream_id}, block=block_ms)
        return [self._parse(entry) for _, entries in answer for entry in entries]

    @staticmethod
    def _parse(entry) -> StreamedEvent:
        stream_id, fields = entry
        stream_id = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
        return StreamedEvent(stream_id, JobEvent.model_validate_json(fields[b"data"]))

    async def close(self) -> None:
        await self.redis.aclose()
