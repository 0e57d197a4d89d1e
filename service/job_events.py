"""GET /jobs/{id}/events: a job's events as Server-Sent Events, from the job row first, then from Redis.

A stream starts with the job as its row has it (a `status` event), or, for a client that reconnects with
Last-Event-ID, with the events it missed: from the job's Redis stream when it still holds them all, else the
row again. Then it forwards the events the workers publish (sepen_store.events), through the process's one
EventHub (one blocked Redis read for all its streams, not a connection per client): no database read per client,
except the row once every few quiet heartbeats in case a publish was lost. Without a Redis
broker (the embedded mode) it reads the row every SEPEN_EVENTS_POLL_S instead, and sends what changed.

A comment line goes out after every SEPEN_EVENTS_HEARTBEAT_S without an event, so that proxies keep the
connection open. The stream ends after the event of a finished job, or after SEPEN_EVENTS_MAX_STREAM_S (the
client reconnects with Last-Event-ID and loses nothing). A client that reconnects to a finished job whose last
event it has gets 204, which tells an EventSource to stop reconnecting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import anyio
import redis
from fastapi import Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker

from sepen_store.contract import JobEvent
from sepen_store.events import EventHub, StreamedEvent, Subscription, event_of
from sepen_store.jobs import job_view
from sepen_store.settings import GatewaySettings

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no-buffering: nginx would hold events back
HEARTBEAT = b": keep-alive\n\n"
RETRY_MS = 2000  # how long an EventSource waits before it reconnects
RESYNC_EVERY = 4  # quiet heartbeats between reads of the row when the events come from Redis


def encode(event: JobEvent) -> bytes:
    return f"id: {event.seq}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()


def _current(sessions: sessionmaker[Session], tenant: str, job_id: str) -> JobEvent:
    with sessions() as session:
        return event_of(job_view(session.connection(), tenant, job_id))


def catch_up(current: JobEvent, held: list[StreamedEvent] | None, last_seq: int | None) -> list[JobEvent]:
    """What a stream sends first: nothing when the client has the last event; the events after last_seq when the
    Redis stream still holds them all (those of a finished job up to its last); else the job as it is."""
    if last_seq == current.seq:
        return []
    if last_seq is not None and last_seq < current.seq and held:
        seqs = {item.event.seq for item in held}
        if last_seq + 1 in seqs and (not current.terminal or current.seq in seqs):
            return [item.event for item in held if item.event.seq > last_seq]
    return [current]


async def event_stream_response(
    sessions: sessionmaker[Session],
    settings: GatewaySettings,
    hub: EventHub | None,
    tenant: str,
    job_id: str,
    last_seq: int | None,
) -> Response:
    """The response of GET /jobs/{id}/events; NotFound (404) before anything is streamed. hub: the process's reader of
    job streams (None without a Redis broker: the row is polled)."""
    held = None
    if hub is not None:
        try:
            held = await hub.held(job_id)  # before the row: what is published after this read comes next
        except redis.RedisError as exc:
            log.warning("job events: Redis unavailable (%s); reading the job row instead", exc)
            hub = None
    current = await run_in_threadpool(_current, sessions, tenant, job_id)
    first = catch_up(current, held, last_seq)
    if not first and current.terminal:
        return Response(status_code=204, headers=HEADERS)
    after_id = held[-1].stream_id if held else "0-0"
    stream = _stream(sessions, settings, hub, tenant, job_id, current, first, after_id)
    return StreamingResponse(stream, media_type=MEDIA_TYPE, headers=HEADERS)


async def _stream(
    sessions: sessionmaker[Session],
    settings: GatewaySettings,
    hub: EventHub | None,
    tenant: str,
    job_id: str,
    current: JobEvent,
    first: list[JobEvent],
    after_id: str,
) -> AsyncIterator[bytes]:
    """The stream's bytes. Its subscription to the hub (from after_id, the last entry `first` was made from) is taken
    when the stream starts and closed when it ends, whatever ends it: a response that never started (its client
    left before the first byte) holds none."""
    started = time.monotonic()
    last_seq, last_status = current.seq if not first else -1, current.status
    quiet = 0
    last_sent = time.monotonic()

    def fresh(event: JobEvent) -> bool:
        return event.seq > last_seq

    subscription: Subscription | None = None
    try:
        if hub is not None:
            subscription = hub.subscribe(job_id, after_id)
        yield f"retry: {RETRY_MS}\n\n".encode()
        for event in filter(fresh, first):
            yield encode(event)
            last_seq, last_status = event.seq, event.status
        if current.terminal and last_seq >= current.seq:
            return
        while time.monotonic() - started < settings.events_max_stream_s:
            if subscription is not None:
                try:
                    batch = await subscription.next(settings.events_heartbeat_s)
                except redis.RedisError as exc:
                    log.warning("job events: Redis unavailable (%s); reading the job row instead", exc)
                    subscription.close()
                    subscription = None
                    continue
                if batch:
                    quiet = 0
                    for event in (item.event for item in batch if fresh(item.event)):
                        yield encode(event)
                        last_seq, last_status = event.seq, event.status
                        if event.terminal:
                            return
                    continue
                yield HEARTBEAT
                quiet += 1
                if quiet % RESYNC_EVERY:
                    continue
            else:
                await anyio.sleep(settings.events_poll_s)
            row = await run_in_threadpool(_current, sessions, tenant, job_id)
            if fresh(row):
                if row.status == last_status and subscription is None:
                    row = row.model_copy(update={"type": "progress", "result": None, "error": None})
                yield encode(row)
                last_seq, last_status, last_sent = row.seq, row.status, time.monotonic()
                if row.terminal:
                    return
            elif subscription is None and time.monotonic() - last_sent >= settings.events_heartbeat_s:
                yield HEARTBEAT
                last_sent = time.monotonic()
    finally:
        if subscription is not None:
            subscription.close()
