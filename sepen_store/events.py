"""Job events in Redis: each write that changes a job's status or progress publishes its JobEvent to a capped stream
per job, so that a gateway streams a job's events to its clients without reading the database per client.

A gateway process reads every stream its clients watch through one EventHub (one blocked XREAD for all of them).
The job row stays the truth: an event is published after its row committed, and a reader starts from the row
(GET /jobs/{id}/events sends the job as it is first). A stream keeps the last STREAM_MAXLEN events of its job for a
day: enough for a client that reconnects with Last-Event-ID to catch up, and a client further behind gets the row.
Without a Redis broker (the embedded mode) nothing is published and readers poll the row.

A process that writes job rows publishes through the session factory it writes with: `session_factory(engine,
events=EventPublisher(url))` puts the publisher in every session's `info`, and sepen_store.jobs publishes after each
commit that made an event.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
HUB_BLOCK_MS = 500  # a new watcher's stream joins the hub's read within this
HUB_CONNECTIONS = 2
HUB_CLIENT_NAME = "sepen-event-hub-{pid}"  # in Redis's CLIENT LIST: which process's hub a connection is


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


class EventHub:
    """A gateway process's one reader of job streams (asyncio): however many clients watch however many jobs, it
    waits in one XREAD on all their streams at once and hands each entry to the subscriptions of its job, so that
    watchers cost no Redis connection each (a blocked XREAD holds its connection: one per watcher would make Redis's
    maxclients a cap on watchers). Its client has a pool of two: the blocked read, and one for held()."""

    def __init__(self, redis_url: str, *, block_ms: int = HUB_BLOCK_MS):
        self.redis_url = redis_url
        self.block_ms = block_ms
        self._subscriptions: dict[str, set[Subscription]] = {}  # by stream key
        self._positions: dict[str, str] = {}  # by stream key: the last entry handed out
        self._task: asyncio.Task | None = None
        self._client: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None

    @property
    def redis(self) -> redis.asyncio.Redis:
        """The client of the running event loop (an asyncio client serves the loop it was made in)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            # No socket timeout: a read blocks in Redis for up to block_ms, not in the socket.
            client = redis.asyncio.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                client_name=HUB_CLIENT_NAME.format(pid=os.getpid()),
                max_connections=HUB_CONNECTIONS,
            )
            self._client, self._task = (loop, client), None
            self._subscriptions, self._positions = {}, {}  # what another loop watched is gone with it
        return self._client[1]

    async def held(self, job_id: str) -> list[StreamedEvent]:
        """The events the job's stream holds now, oldest first (at most STREAM_MAXLEN or so)."""
        return [_parse(entry) for entry in await self.redis.xrange(stream_key(job_id))]

    def subscribe(self, job_id: str, after_id: str) -> Subscription:
        """The job's events added after `after_id` ('0-0': from the start), as they come. An entry may come twice
        (the stream's readers skip what they have by seq); none is skipped."""
        client = self.redis  # first: a new event loop starts afresh
        key = stream_key(job_id)
        subscription = Subscription(self, key)
        self._subscriptions.setdefault(key, set()).add(subscription)
        known = self._positions.get(key)
        self._positions[key] = after_id if known is None else min(known, after_id, key=_stream_order)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._read_all(client), name="sepen-event-hub")
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        watchers = self._subscriptions.get(subscription.key)
        if watchers is not None:
            watchers.discard(subscription)
            if not watchers:
                del self._subscriptions[subscription.key]
                self._positions.pop(subscription.key, None)

    async def _read_all(self, client: redis.asyncio.Redis) -> None:
        """XREAD every watched stream from where it was left, hand out what comes; end when nobody watches. A Redis
        error is handed to every subscription (their streams fall back to the job rows) and ends the loop."""
        try:
            while self._subscriptions:
                positions = {key: self._positions[key] for key in self._subscriptions}
                answer = await client.xread(positions, block=self.block_ms)
                for key, entries in answer or []:
                    key = key.decode() if isinstance(key, bytes) else key
                    if key not in self._subscriptions or not entries:
                        continue
                    batch = [_parse(entry) for entry in entries]
                    self._positions[key] = max(self._positions[key], batch[-1].stream_id, key=_stream_order)
                    for subscription in self._subscriptions[key]:
                        subscription.queue.put_nowait(batch)
        except redis.RedisError as exc:
            for watchers in self._subscriptions.values():
                for subscription in watchers:
                    subscription.queue.put_nowait(exc)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._client is not None:
            await self._client[1].aclose()


class Subscription:
    """One watcher of one job's stream, fed by its EventHub."""

    def __init__(self, hub: EventHub, key: str):
        self.hub = hub
        self.key = key
        self.queue: asyncio.Queue[list[StreamedEvent] | redis.RedisError] = asyncio.Queue()

    async def next(self, timeout_s: float) -> list[StreamedEvent]:
        """The entries that came next (waiting up to timeout_s; [] if none did); raises the hub's Redis error."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return []
        if isinstance(item, redis.RedisError):
            raise item
        return item

    def close(self) -> None:
        self.hub._unsubscribe(self)


def _stream_order(stream_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = stream_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def _parse(entry) -> StreamedEvent:
    stream_id, fields = entry
    stream_id = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return StreamedEvent(stream_id, JobEvent.model_validate_json(fields[b"data"]))
