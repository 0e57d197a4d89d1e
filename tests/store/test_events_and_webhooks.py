"""Job events and webhook deliveries in sepen_store, on both backends: each status change and progress report counts
the row's event_seq up and is published to the job's Redis stream; a job's webhook gets a delivery row in the same
write (progress coalescing while unsent), taken by one worker at a time, retried with back-off, failed when out of
tries; URL checks, signatures, per-tenant keys, the key cache, and migration 0004 going down and up."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from datetime import timedelta

import pytest
import redis
from sqlalchemy import update

from sepen_store.auth import TenantCache, authenticate_cached, create_api_key, revoke_api_key
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.errors import NotFound, Unauthorized
from sepen_store.events import HUB_CLIENT_NAME, HUB_CONNECTIONS, EventHub, EventPublisher, stream_key
from sepen_store.jobs import claim_job, create_job, finish_job, get_job, heartbeat, job_view, request_cancel
from sepen_store.settings import SettingsError, WorkerSettings
from sepen_store.tables import WebhookDelivery, utcnow
from sepen_store.webhooks import (
    backoff_s,
    job_deliveries,
    record_attempt,
    signature,
    take_due_deliveries,
    tenant_key,
    url_problem,
    verify_signature,
)
from tests.conftest import local_redis_url

EVENTS_REDIS = local_redis_url(12)
HOOK = {"url": "http://127.0.0.1:9/hook", "events": ["running", "progress", "succeeded", "failed", "canceled"]}
SUMMARY_RESULT = {"adapter": "a@1", "name": "a", "version": 1, "sha256": "0" * 64, "summary": {"loss_curve": []}}


@pytest.fixture
def publishing(sessions):
    """The same database's sessions, publishing to Redis db 12; and that Redis."""
    client = redis.Redis.from_url(EVENTS_REDIS)
    publisher = EventPublisher(EVENTS_REDIS)
    yield session_factory(sessions.kw["bind"], events=publisher), client
    publisher.close()
    client.close()


def new_job(session, webhook=None, kind="finetune", tenant="acme"):
    request = {"n": uuid.uuid4().hex, **({"webhook": webhook} if webhook else {})}
    job, _ = create_job(session, tenant, kind, request)
    return job


def streamed(client, job_id):
    return [json.loads(fields[b"data"]) for _, fields in client.xrange(stream_key(job_id))]


def test_each_status_change_and_progress_report_is_a_numbered_published_event(publishing):
    sessions, client = publishing
    with sessions() as s:
        job = new_job(s)
        assert job.event_seq == 0
        claim = claim_job(s, job.id, "w1", lease_s=60)
        heartbeat(s, claim)  # liveness only: no event
        heartbeat(s, claim, {"step": 1, "total": 2})
        heartbeat(s, claim, {"step": 2, "total": 2})
        assert finish_job(s, claim, "succeeded", result=SUMMARY_RESULT)
        assert get_job(s, "acme", job.id).event_seq == 4
    events = streamed(client, job.id)
    assert [(e["seq"], e["type"], e["status"]) for e in events] == [
        (1, "status", "running"),
        (2, "progress", "running"),
        (3, "progress", "running"),
        (4, "status", "succeeded"),
    ]
    assert events[2]["progress"] == {"step": 2, "total": 2}
    assert events[3]["result"] == {**SUMMARY_RESULT, "summary": None}  # events leave a finetune's summary out
    assert client.ttl(stream_key(job.id)) > 0


def hub_connections(client) -> list[dict]:
    """The connections of this process's event hubs, in Redis's CLIENT LIST."""
    return [c for c in client.client_list() if c.get("name") == HUB_CLIENT_NAME.format(pid=os.getpid())]


def test_one_hub_reads_every_watched_stream_and_hands_each_its_own(publishing):
    """Subscriptions to two jobs' streams, one of them twice from different places: each gets its own job's events,
    the later subscriber (from the stream's start) what came before it too, all through at most HUB_CONNECTIONS
    connections; a closed subscription gets nothing more and a hub with no subscription stops reading."""
    writer, client = publishing
    with writer() as session:
        first, second = new_job(session), new_job(session)

    async def watch() -> tuple[list, list, list]:
        hub = EventHub(EVENTS_REDIS, block_ms=100)
        try:
            early = hub.subscribe(first.id, "0-0")
            other = hub.subscribe(second.id, "0-0")
            with writer() as session:
                claim_job(session, first.id, "w", lease_s=60)
                claim_job(session, second.id, "w", lease_s=60)
            got_early = await early.next(5)
            late = hub.subscribe(first.id, "0-0")  # sets the stream back: the early one may see entries twice
            got_late = await late.next(5)
            got_other = await other.next(5)
            assert 1 <= len(hub_connections(client)) <= HUB_CONNECTIONS
            for subscription in (early, late, other):
                subscription.close()
            await asyncio.sleep(0.3)
            assert hub._task.done()  # nobody watches: no read waits in Redis
            return got_early, got_late, got_other
        finally:
            await hub.close()

    got_early, got_late, got_other = asyncio.run(watch())
    assert [(e.event.job_id, e.event.seq) for e in got_early] == [(first.id, 1)]
    assert [(e.event.job_id, e.event.seq) for e in got_late] == [(first.id, 1)]
    assert [(e.event.job_id, e.event.seq) for e in got_other] == [(second.id, 1)]


def test_many_catch_up_reads_at_once_wait_for_a_connection_instead_of_failing(publishing):
    """Forty clients asking what a stream holds at the same moment, while the hub's read waits in Redis: each gets the
    stream, through the hub's few connections (a pool that refuses when all are busy would fail most of them)."""
    writer, client = publishing
    with writer() as session:
        job = new_job(session)
        claim_job(session, job.id, "w", lease_s=60)

    async def ask() -> list[list]:
        hub = EventHub(EVENTS_REDIS, block_ms=2000)
        try:
            subscription = hub.subscribe(job.id, "0-0")
            assert [e.event.seq for e in await subscription.next(5)] == [1]  # the read now waits for more
            held = await asyncio.gather(*(hub.held(job.id) for _ in range(40)))
            assert len(hub_connections(client)) <= HUB_CONNECTIONS
            subscription.close()
            return held
        finally:
            await hub.close()

    for held in asyncio.run(ask()):
        assert [(e.event.job_id, e.event.seq) for e in held] == [(job.id, 1)]


def test_a_failed_read_is_retried_while_the_subscriptions_wait(publishing, caplog):
    """A read that Redis refuses (here: one of the watched keys is not a stream) fails no subscription: the hub logs
    it and reads again with back-off, and once the read works the waiting watchers get what was published meanwhile."""
    writer, client = publishing
    with writer() as session:
        job = new_job(session)
    broken = f"not-a-stream-{uuid.uuid4().hex}"
    client.set(stream_key(broken), "a string where a stream should be")

    async def watch() -> list:
        hub = EventHub(EVENTS_REDIS, block_ms=100)
        try:
            watcher = hub.subscribe(job.id, "0-0")
            other = hub.subscribe(broken, "0-0")
            assert await watcher.next(1.0) == []  # the read fails: nothing, and no error
            with writer() as session:
                claim_job(session, job.id, "w", lease_s=60)
            assert await watcher.next(1.0) == []
            client.delete(stream_key(broken))
            got = await watcher.next(15)
            other.close()
            watcher.close()
            return got
        finally:
            await hub.close()

    with caplog.at_level(logging.WARNING, logger="sepen_store.events"):
        got = asyncio.run(watch())
    assert [(e.event.job_id, e.event.seq) for e in got] == [(job.id, 1)]
    assert any("reading the streams failed" in r.getMessage() and "WRONGTYPE" in r.getMessage() for r in caplog.records)


def test_an_entry_that_is_not_a_job_event_is_skipped_and_logged(publishing, caplog):
    writer, client = publishing
    with writer() as session:
        job = new_job(session)
    client.xadd(stream_key(job.id), {"data": "not a job event"})
    client.xadd(stream_key(job.id), {"something": "else"})

    async def watch() -> tuple[list, list]:
        hub = EventHub(EVENTS_REDIS, block_ms=100)
        try:
            watcher = hub.subscribe(job.id, "0-0")
            with writer() as session:
                claim = claim_job(session, job.id, "w", lease_s=60)
            got = await watcher.next(5)
            with writer() as session:
                heartbeat(session, claim, {"step": 1, "total": 2})
            got += await watcher.next(5)
            watcher.close()
            return got, await hub.held(job.id)
        finally:
            await hub.close()

    with caplog.at_level(logging.WARNING, logger="sepen_store.events"):
        got, held = asyncio.run(watch())
    assert [e.event.seq for e in got] == [1, 2] and [e.event.seq for e in held] == [1, 2]
    skipped = [r.getMessage() for r in caplog.records if "not a job event" in r.getMessage()]
    assert skipped and all(stream_key(job.id) in line for line in skipped)


def test_a_subscriber_behind_the_hubs_read_gets_what_it_missed_then_the_live_entries(publishing):
    """A second watcher of a job joins from an older entry than the hub has read to, while the hub's read waits in
    Redis: it gets the entries in between at once (read by itself), then the next live entry, each once; the first
    watcher gets no entry twice."""
    writer, client = publishing
    with writer() as session:
        job = new_job(session)
        claim = claim_job(session, job.id, "w", lease_s=60)
        heartbeat(session, claim, {"step": 1, "total": 3})
    first_id, second_id = [entry_id.decode() for entry_id, _ in client.xrange(stream_key(job.id))]

    async def watch() -> tuple[list, list]:
        hub = EventHub(EVENTS_REDIS, block_ms=3000)
        try:
            early = hub.subscribe(job.id, "0-0")
            got_early = await early.next(5)
            while len(got_early) < 2:
                got_early += await early.next(5)
            await asyncio.sleep(0.1)  # the hub's next read now waits in Redis, after the second entry
            late = hub.subscribe(job.id, first_id)
            got_late = await late.next(1.0)  # at once, not when the hub's read returns
            with writer() as session:
                heartbeat(session, claim, {"step": 2, "total": 3})
            got_late += await late.next(5)
            got_early += await early.next(5)
            for subscription in (early, late):
                subscription.close()
            return got_early, got_late
        finally:
            await hub.close()

    got_early, got_late = asyncio.run(watch())
    assert [e.event.seq for e in got_early] == [1, 2, 3]
    assert [e.event.seq for e in got_late] == [2, 3] and got_late[0].stream_id == second_id


def test_a_cancel_is_an_event_and_a_session_without_publisher_publishes_nothing(publishing, sessions):
    publishing_sessions, client = publishing
    with publishing_sessions() as s:
        queued = new_job(s)
        request_cancel(s, "acme", queued.id)
    assert [(e["seq"], e["status"]) for e in streamed(client, queued.id)] == [(1, "canceled")]
    with sessions() as s:  # no publisher: the row still counts its events
        job = new_job(s)
        claim_job(s, job.id, "w1", lease_s=60)
        assert get_job(s, "acme", job.id).event_seq == 1
    assert streamed(client, job.id) == []


def test_a_failed_finish_carries_its_error(publishing):
    sessions, client = publishing
    with sessions() as s:
        job = new_job(s, kind="generate")
        claim = claim_job(s, job.id, "w1", lease_s=60)
        finish_job(s, claim, "failed", error_code="out_of_memory", error_message="too big")
    assert streamed(client, job.id)[-1]["error"] == {"code": "out_of_memory", "message": "too big"}


def test_job_view_reads_the_row_and_hides_other_tenants_jobs(sessions):
    with sessions() as s:
        job = new_job(s, webhook=HOOK)
        view = job_view(s.connection(), "acme", job.id)
        assert (view.id, view.status, view.event_seq, view.webhook) == (job.id, "queued", 0, HOOK)
        assert view.created_at.tzinfo is not None
        with pytest.raises(NotFound):
            job_view(s.connection(), "globex", job.id)


def test_deliveries_are_queued_with_their_event_and_progress_coalesces(sessions):
    with sessions() as s:
        job = new_job(s, webhook={**HOOK, "events": ["progress", "succeeded"]})
        claim = claim_job(s, job.id, "w1", lease_s=60)  # running: not asked for
        heartbeat(s, claim, {"step": 1, "total": 3})
        heartbeat(s, claim, {"step": 2, "total": 3})  # replaces the unsent report
        finish_job(s, claim, "succeeded", result={"images": []})
        deliveries = job_deliveries(s, job.id)
        assert [(d.event, d.event_seq, d.state) for d in deliveries] == [
            ("succeeded", 4, "pending"),
            ("progress", 3, "pending"),
        ]
        assert deliveries[1].payload["progress"] == {"step": 2, "total": 3}
        assert deliveries[0].payload["result"] == {"images": []} and deliveries[0].tenant == "acme"
        plain = new_job(s)
        claim_job(s, plain.id, "w1", lease_s=60)
        assert job_deliveries(s, plain.id) == []


def test_a_delivery_is_taken_once_retried_with_backoff_then_delivered(sessions):
    with sessions() as s:
        job = new_job(s, webhook={**HOOK, "events": ["running"]})
        claim_job(s, job.id, "w1", lease_s=60)
        taken = [d for d in take_due_deliveries(s, lease_s=30) if d.job_id == job.id]
        assert len(taken) == 1 and taken[0].attempt == 1 and taken[0].payload["status"] == "running"
        assert not [d for d in take_due_deliveries(s, lease_s=30) if d.job_id == job.id]  # leased to its taker
        started = utcnow()
        state = record_attempt(
            s, taken[0], started=started, status=500, error="answered 500", duration_ms=3.0, retry_after_s=60
        )
        assert state == "pending"
        row = job_deliveries(s, job.id)[0]
        assert row.attempts == 1 and row.last_status == 500 and row.next_attempt_at > utcnow() + timedelta(seconds=50)
        assert row.log == [{"at": started.isoformat(), "status": 500, "error": "answered 500", "duration_ms": 3.0}]
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == row.id).values(next_attempt_at=utcnow()))
        s.commit()
        again = [d for d in take_due_deliveries(s, lease_s=30) if d.job_id == job.id]
        assert [d.attempt for d in again] == [2]
        assert record_attempt(
            s, taken[0], started=utcnow(), status=200, error=None, duration_ms=1, retry_after_s=9
        ) == (
            "pending"  # attempt 1's late answer changes nothing: attempt 2 owns the delivery now
        )
        assert (
            record_attempt(s, again[0], started=utcnow(), status=204, error=None, duration_ms=2, retry_after_s=9)
            == "delivered"
        )
        row = job_deliveries(s, job.id)[0]
        assert row.state == "delivered" and row.finished_at is not None and [e["status"] for e in row.log] == [500, 204]


def test_a_delivery_without_tries_left_fails(sessions):
    with sessions() as s:
        job = new_job(s, webhook={**HOOK, "events": ["canceled"]})
        request_cancel(s, "acme", job.id)
        (delivery,) = [d for d in take_due_deliveries(s, lease_s=30) if d.job_id == job.id]
        state = record_attempt(
            s,
            delivery,
            started=utcnow(),
            status=None,
            error="ConnectionRefusedError",
            duration_ms=1,
            retry_after_s=None,
        )
        assert state == "failed" and job_deliveries(s, job.id)[0].state == "failed"


def test_backoff_doubles_up_to_an_hour():
    assert [backoff_s(5, attempt) for attempt in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff_s(5, 30) == 3600


@pytest.mark.parametrize(
    "url, problem",
    [
        ("http://127.0.0.1:8080/hook", None),
        ("https://hooks.example.com/a?b=c", None),
        ("http://HOOKS.example.com:8443/", None),
        ("http://localhost:9000/", None),  # localhost:9000 is allowed with its port
        ("http://localhost:9001/", "host 'localhost' is not one"),
        ("http://evil.example.com/", "host 'evil.example.com' is not one"),
        ("ftp://127.0.0.1/", "http:// or https://"),
        ("127.0.0.1/hook", "http:// or https://"),
        ("http://user:pw@127.0.0.1/", "credentials"),
        ("http://127.0.0.1:99999/", "not a URL"),
    ],
)
def test_url_problem(url, problem):
    found = url_problem(url, ("127.0.0.1", "hooks.example.com", "localhost:9000"))
    assert found is None if problem is None else problem in found


def test_signatures_verify_only_with_the_tenants_key_and_a_recent_time():
    key = tenant_key("s" * 32, "acme")
    assert key != tenant_key("s" * 32, "globex") and key != tenant_key("t" * 32, "acme") and len(key) == 64
    body = b'{"seq":1}'
    header = signature(key, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert verify_signature(key, header, body, now=1_700_000_100)
    assert not verify_signature(key, header, body + b" ", now=1_700_000_100)
    assert not verify_signature(tenant_key("s" * 32, "globex"), header, body, now=1_700_000_100)
    assert not verify_signature(key, header, body, now=1_700_001_000)  # too old: a replay
    assert not verify_signature(key, "v1=abc", body)


def test_the_key_cache_remembers_valid_keys_for_its_ttl(sessions):
    now = [0.0]
    cache = TenantCache(10, max_entries=2, clock=lambda: now[0])
    with sessions() as s:
        key = create_api_key(s, "cached")
    assert authenticate_cached(sessions, cache, key) == "cached"
    with sessions() as s:
        revoke_api_key(s, key[:15])
    now[0] = 9.9
    assert authenticate_cached(sessions, cache, key) == "cached"  # still remembered
    now[0] = 10.0
    with pytest.raises(Unauthorized):
        authenticate_cached(sessions, cache, key)
    with pytest.raises(Unauthorized):
        authenticate_cached(sessions, cache, "sk_sepen_unknown")
    for name in ("a", "b", "c"):
        cache.put(name, name)
    assert cache.get("a") is None and cache.get("c") == "c"  # at most max_entries, the oldest out
    nothing = TenantCache(0)
    nothing.put("a", "a")
    assert nothing.get("a") is None


def test_webhook_settings_are_checked(monkeypatch):
    monkeypatch.setenv("SEPEN_WEBHOOK_ALLOWED_HOSTS", "Hooks.Example.com, 127.0.0.1:9000")
    monkeypatch.setenv("SEPEN_WEBHOOK_SECRET", "x" * 16)
    assert WorkerSettings.from_env().webhook_allowed_hosts == ("hooks.example.com", "127.0.0.1:9000")
    monkeypatch.setenv("SEPEN_WEBHOOK_SECRET", "short")
    with pytest.raises(SettingsError, match="SEPEN_WEBHOOK_SECRET"):
        WorkerSettings.from_env()
    monkeypatch.setenv("SEPEN_WEBHOOK_ALLOWED_HOSTS", "https://hooks.example.com")
    with pytest.raises(SettingsError, match="SEPEN_WEBHOOK_ALLOWED_HOSTS: entry 'https://hooks.example.com'"):
        WorkerSettings.from_env()


def test_the_events_migration_goes_down_and_up_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'sepen.db'}"
    upgrade_database(url)
    sessions = session_factory(make_engine(url))
    with sessions() as s:
        job = new_job(s, webhook=HOOK)
        claim_job(s, job.id, "w1", lease_s=60)
    from alembic import command

    from sepen_store.database import alembic_config

    command.downgrade(alembic_config(url), "0003")
    upgrade_database(url)
    with sessions() as s:
        row = job_view(s.connection(), "acme", job.id)
        assert row.event_seq == 0 and row.webhook is None and job_deliveries(s, job.id) == []
