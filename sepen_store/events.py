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
HUB_CONNECTIONS = 4  # one for the blocked read, three for held() and the catch-up reads of subscriptions
HUB_POOL_WAIT_S = 5.0  # how long held() or a catch-up read waits for a free connection before it fails
HUB_RETRY_FIRST_S = 0.5  # after a failed read, the hub reads again after this, then twice as long each time...
HUB_RETRY_LONGEST_S = 10.0  # ...up to this
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
    maxclients a cap on watchers).

    Its connections, HUB_CONNECTIONS at most: one for the blocked read, the others a blocking pool for held() and for
    the catch-up reads of subscriptions (a call that finds them all busy waits up to HUB_POOL_WAIT_S for one). A read
    that fails (Redis away, a stream of the wrong type) is tried again after HUB_RETRY_FIRST_S, then twice as long
    each time up to HUB_RETRY_LONGEST_S, while the subscriptions wait: their streams go on with heartbeats and the
    job rows meanwhile. An entry that is not a JobEvent is logged and skipped."""

    def __init__(self, redis_url: str, *, block_ms: int = HUB_BLOCK_MS):
        self.redis_url = redis_url
        self.block_ms = block_ms
        self._subscriptions: dict[str, set[Subscription]] = {}  # by stream key
        self._positions: dict[str, str] = {}  # by stream key: the last entry the read loop handed out
        self._task: asyncio.Task | None = None
        # The running event loop's clients (an asyncio client serves the loop it was made in): (loop, reader, pool).
        self._clients: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis, redis.asyncio.Redis] | None = None

    def _clients_of_loop(self) -> tuple[redis.asyncio.Redis, redis.asyncio.Redis]:
        loop = asyncio.get_running_loop()
        if self._clients is None or self._clients[0] is not loop:
            name = HUB_CLIENT_NAME.format(pid=os.getpid())

            def client(connections: int, socket_timeout_s: float) -> redis.asyncio.Redis:
                pool = redis.asyncio.BlockingConnectionPool.from_url(
                    self.redis_url,
                    max_connections=connections,
                    timeout=HUB_POOL_WAIT_S,
                    socket_connect_timeout=REDIS_TIMEOUT_S,
                    socket_timeout=socket_timeout_s,
                    client_name=name,
                )
                return redis.asyncio.Redis(connection_pool=pool)

            # The reader's socket waits out the read's block in Redis, and then some.
            reader = client(1, self.block_ms / 1000 + REDIS_TIMEOUT_S)
            self._clients, self._task = (loop, reader, client(HUB_CONNECTIONS - 1, REDIS_TIMEOUT_S)), None
            self._subscriptions, self._positions = {}, {}  # what another loop watched is gone with it
        return self._clients[1], self._clients[2]

    @property
    def redis(self) -> redis.asyncio.Redis:
        """The client of held() and the catch-up reads, for the running event loop."""
        return self._clients_of_loop()[1]

    async def held(self, job_id: str) -> list[StreamedEvent]:
        """The events the job's stream holds now, oldest first (at most STREAM_MAXLEN or so)."""
        key = stream_key(job_id)
        return _parsed(key, await self.redis.xrange(key))[0]

    def subscribe(self, job_id: str, after_id: str) -> Subscription:
        """The job's events added after `after_id` ('0-0': from the start), as they come, each once and in order.
        A subscription that starts behind the stream's read position (another watcher of the job has had newer
        entries) reads what lies between with XRANGE itself before it takes the live entries."""
        reader, _ = self._clients_of_loop()  # first: a new event loop starts afresh
        key = stream_key(job_id)
        position = self._positions.get(key)
        if position is None:  # the first watcher of this stream: the read starts where it asks
            self._positions[key] = position = after_id
        subscription = Subscription(self, key, after_id, position)
        self._subscriptions.setdefault(key, set()).add(subscription)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._read_all(reader), name="sepen-event-hub")
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        watchers = self._subscriptions.get(subscription.key)
        if watchers is not None:
            watchers.discard(subscription)
            if not watchers:
                del self._subscriptions[subscription.key]
                self._positions.pop(subscription.key, None)

    async def _read_all(self, reader: redis.asyncio.Redis) -> None:
        """XREAD every watched stream from where it was left, hand out what comes; end when nobody watches. A failed
        read is logged and tried again with back-off, the subscriptions waiting meanwhile."""
        wait = 0.0
        while self._subscriptions:
            try:
                positions = {key: self._positions[key] for key in self._subscriptions}
                answer = await reader.xread(positions, block=self.block_ms)
            except Exception as exc:  # noqa: BLE001 - the read goes on: its watchers have the job rows meanwhile
                wait = min(HUB_RETRY_LONGEST_S, wait * 2) if wait else HUB_RETRY_FIRST_S
                log.warning("job events: reading the streams failed (%s); trying again in %.1f s", exc, wait)
                await asyncio.sleep(wait)
                continue
            if wait:
                log.info("job events: reading the streams again")
                wait = 0.0
            for key, entries in answer or []:
                key = key.decode() if isinstance(key, bytes) else key
                if key not in self._subscriptions or not entries:
                    continue
                batch, last_id = _parsed(key, entries)
                self._positions[key] = max(self._positions[key], last_id, key=_stream_order)
                for subscription in self._subscriptions[key]:
                    subscription.feed(batch)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._clients is not None:
            for client in self._clients[1:]:
                await client.aclose()
                await client.connection_pool.disconnect()


class Subscription:
    """One watcher of one job's stream, fed by its EventHub: first (when it started behind the hub's read) the entries
    after `after_id` up to the hub's position then, read by itself; then the live entries past that."""

    def __init__(self, hub: EventHub, key: str, after_id: str, hub_position: str):
        self.hub = hub
        self.key = key
        behind = _stream_order(after_id) < _stream_order(hub_position)
        self._catch_up: tuple[str, str] | None = (after_id, hub_position) if behind else None
        self._last = hub_position if behind else after_id  # the last entry this subscription has had
        self.queue: asyncio.Queue[list[StreamedEvent]] = asyncio.Queue()

    def feed(self, batch: list[StreamedEvent]) -> None:
        """The hub's live entries: those past what this subscription has had go to its queue."""
        fresh = [item for item in batch if _stream_order(item.stream_id) > _stream_order(self._last)]
        if fresh:
            self._last = fresh[-1].stream_id
            self.queue.put_nowait(fresh)

    async def next(self, timeout_s: float) -> list[StreamedEvent]:
        """The entries that came next (waiting up to timeout_s; [] if none did). Raises a Redis error only from its
        own catch-up read (then the caller reads the job row instead)."""
        if self._catch_up is not None:
            after_id, upto_id = self._catch_up
            entries = await self.hub.redis.xrange(self.key, min=f"({after_id}", max=upto_id)
            self._catch_up = None
            batch, _ = _parsed(self.key, entries)
            if batch:
                return batch
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return []

    def close(self) -> None:
        self.hub._unsubscribe(self)


def _stream_order(stream_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = stream_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def _parsed(key: str, entries: list) -> tuple[list[StreamedEvent], str | None]:
    """The stream's entries as events, and the id of the last entry (None: no entries). An entry that is not a
    JobEvent (written by something else, or damaged) is logged and skipped, never raised: its readers go on past it."""
    events, last_id = [], None
    for stream_id, fields in entries:
        last_id = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
        try:
            events.append(StreamedEvent(last_id, JobEvent.model_validate_json(fields[b"data"])))
        except (KeyError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            log.warning("job events: skipped entry %s of %s, which is not a job event: %s", last_id, key, exc)
    return events, last_id
