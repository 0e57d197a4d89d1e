"""GET /jobs/{id}/events against the real gateway (uvicorn), once with Postgres + Redis (events from the job's Redis
stream) and once in the embedded mode (SQLite, the row polled), the job written through sepen_store as a worker
writes it: the current state first, then each change live, the end after the last; Last-Event-ID (replayed from
Redis, else the row; 204 once the job is done); a publish that never reached Redis still arrives; heartbeat
comments; the stream's time limit; tenant isolation; a revoked key stops working within SEPEN_KEY_CACHE_TTL_S.
Webhook fields of POST /finetune and POST /generate, and GET /jobs/{id}/deliveries."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from sepen_store.auth import create_api_key, revoke_api_key
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.events import HUB_CLIENT_NAME, HUB_CONNECTIONS, EventHub, EventPublisher
from sepen_store.jobs import claim_job, create_job, finish_job, heartbeat
from service.app import create_app
from service.job_events import event_stream_response
from tests.e2e.conftest import free_port, launch_gateway, wait_until
from tests.service.conftest import REDIS_URL

HEARTBEAT_S = 0.5
MAX_STREAM_S = 6.0
GENERATE = {"prompt": "a photo of a cat and a dog", "steps": 2}


def generate_result(*seeds: int) -> dict:
    """A stored generate result, as a worker writes it."""
    images = [{"index": i, "seed": seed, "heatmap": False, "scores": None} for i, seed in enumerate(seeds)]
    return {"images": images, "adapter": None, "model": "sepen-tiny", "concepts": [], "sample": {}}


class Gateway:
    def __init__(self, mode: str, url: str, base_url: str, process: subprocess.Popen):
        self.mode = mode
        self.url = url
        self.base_url = base_url
        self.process = process
        engine = make_engine(url)
        self.tenant = f"events-{uuid.uuid4().hex[:8]}"
        self.publisher = EventPublisher(REDIS_URL) if mode == "servers" else None
        self.sessions = session_factory(engine, events=self.publisher)  # what a worker writes with
        self.silent = session_factory(engine)  # a writer whose events never reach Redis
        with self.sessions() as session:
            self.key = create_api_key(session, self.tenant)
            self.other_key = create_api_key(session, f"other-{self.tenant}")

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def new_job(self, kind: str = "generate"):
        with self.sessions() as session:
            job, _ = create_job(session, self.tenant, kind, {"n": uuid.uuid4().hex})
        return job


@pytest.fixture(scope="module", params=["servers", "embedded"])
def gateway(request, pg_url, redis_client, tmp_path_factory):
    data = tmp_path_factory.mktemp(f"events-{request.param}")
    if request.param == "servers":
        url, broker = pg_url, REDIS_URL
    else:
        url, broker = f"sqlite:///{data / 'sepen.db'}", ""
        upgrade_database(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEPEN_")}
    env.update(
        SEPEN_DATABASE_URL=url,
        SEPEN_BROKER_URL=broker,
        SEPEN_DATA_DIR=str(data),
        SEPEN_MODELS="sepen-tiny=tiny",
        SEPEN_EVENTS_HEARTBEAT_S=str(HEARTBEAT_S),
        SEPEN_EVENTS_POLL_S="0.1",
        SEPEN_EVENTS_MAX_STREAM_S=str(MAX_STREAM_S),
        SEPEN_KEY_CACHE_TTL_S="1",
        OMP_NUM_THREADS="1",
    )
    port = free_port()
    process = launch_gateway(env, port, data / "gateway.log")
    try:
        yield Gateway(request.param, url, f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        process.wait(15)


class EventStream:
    """Reads a stream in a thread: `events` as they come (id, event, data), `comments`, `closed` when it ends."""

    def __init__(self, url: str, headers: dict[str, str]):
        self.events: list[dict] = []
        self.comments: list[str] = []
        self.status: int | None = None
        self.content_type = ""
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, headers), daemon=True)
        self._thread.start()

    def _read(self, url: str, headers: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", url, headers=headers, timeout=30) as response:
                self.status, self.content_type = response.status_code, response.headers.get("content-type", "")
                fields: dict = {}
                for line in response.iter_lines():
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line == "":
                        if "data" in fields:
                            self.events.append({**fields, "data": json.loads(fields["data"])})
                        fields = {}
                    else:
                        name, _, value = line.partition(": ")
                        fields[name] = value
        finally:
            self.closed.set()

    def wait_for(self, count: int, timeout: float = 10) -> list[dict]:
        wait_until(lambda: len(self.events) >= count or self.closed.is_set(), timeout, f"{count} events")
        return self.events

    def summary(self) -> list[tuple]:
        return [(int(e["id"]), e["event"], e["data"]["status"]) for e in self.events]


def stream(gateway: Gateway, job_id: str, **headers: str) -> EventStream:
    return EventStream(f"{gateway.base_url}/jobs/{job_id}/events", {**gateway.auth(), **headers})


def test_the_current_state_first_then_each_change_then_the_end(gateway):
    job = gateway.new_job()
    events = stream(gateway, job.id)
    assert events.wait_for(1)[0]["data"] == {
        "seq": 0,
        "type": "status",
        "job_id": job.id,
        "kind": "generate",
        "status": "queued",
        "at": events.events[0]["data"]["at"],
        "progress": None,
        "result": None,
        "error": None,
    }
    assert events.status == 200 and events.content_type.startswith("text/event-stream")
    with gateway.sessions() as s:
        claim = claim_job(s, job.id, "w1", lease_s=60)
        events.wait_for(2)
        for step in (1, 2):
            heartbeat(s, claim, {"step": step, "total": 2})
            events.wait_for(2 + step)
        finish_job(s, claim, "succeeded", result=generate_result(7))
    assert events.closed.wait(10), "the stream goes on after the job's last event"
    assert events.summary() == [
        (0, "status", "queued"),
        (1, "status", "running"),
        (2, "progress", "running"),
        (3, "progress", "running"),
        (4, "status", "succeeded"),
    ]
    assert events.events[3]["data"]["progress"] == {"step": 2, "total": 2}
    assert events.events[-1]["data"]["result"]["images"][0]["seed"] == 7


def test_a_finished_job_streams_its_state_and_ends_and_a_client_that_has_it_gets_204(gateway):
    job = gateway.new_job()
    with gateway.sessions() as s:
        claim = claim_job(s, job.id, "w1", lease_s=60)
        finish_job(s, claim, "failed", error_code="out_of_memory", error_message="too big")
    done = stream(gateway, job.id)
    assert done.closed.wait(10)
    assert done.summary() == [(2, "status", "failed")]
    assert done.events[0]["data"]["error"] == {"code": "out_of_memory", "message": "too big"}
    again = httpx.get(f"{gateway.base_url}/jobs/{job.id}/events", headers={**gateway.auth(), "Last-Event-ID": "2"})
    assert again.status_code == 204 and again.content == b""


def test_a_client_that_reconnects_gets_what_it_missed(gateway):
    job = gateway.new_job()
    with gateway.sessions() as s:
        claim = claim_job(s, job.id, "w1", lease_s=60)
        for step in (1, 2, 3):
            heartbeat(s, claim, {"step": step, "total": 9})
        resumed = stream(gateway, job.id, **{"Last-Event-ID": "2"})
        resumed.wait_for(1)
        time.sleep(0.3)
        if gateway.mode == "servers":  # Redis holds the events after 2
            assert resumed.summary() == [(3, "progress", "running"), (4, "progress", "running")]
        else:  # the row is all there is: it as it is now
            assert resumed.summary() == [(4, "status", "running")]
        finish_job(s, claim, "succeeded", result=generate_result())
    assert resumed.closed.wait(10) and resumed.summary()[-1] == (5, "status", "succeeded")


def test_an_event_that_never_reached_redis_still_arrives(gateway):
    job = gateway.new_job()
    events = stream(gateway, job.id)
    events.wait_for(1)
    with gateway.silent() as s:  # no publisher: in Redis mode the gateway finds it at its next look at the row
        claim = claim_job(s, job.id, "w1", lease_s=60)
        finish_job(s, claim, "canceled")
    assert events.closed.wait(5 * HEARTBEAT_S + 5)
    assert events.summary()[-1] == (2, "status", "canceled")


def test_a_quiet_stream_sends_heartbeats_and_ends_after_its_time_limit(gateway):
    job = gateway.new_job()
    started = time.monotonic()
    events = stream(gateway, job.id)
    assert events.closed.wait(MAX_STREAM_S + 20)
    # Not before its limit; after it by what a loaded machine may add (without the limit a queued job's stream is
    # endless).
    assert MAX_STREAM_S - 0.5 <= time.monotonic() - started <= MAX_STREAM_S + 15
    assert events.summary() == [(0, "status", "queued")]
    assert len(events.comments) >= 4 and set(events.comments) == {": keep-alive"}


def test_streams_are_the_tenants_own(gateway):
    job = gateway.new_job()
    url = f"{gateway.base_url}/jobs/{job.id}/events"
    other = httpx.get(url, headers=gateway.auth(gateway.other_key))
    assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    assert httpx.get(url).status_code == 401
    assert httpx.get(f"{gateway.base_url}/jobs/nope/events", headers=gateway.auth()).status_code == 422
    bad = httpx.get(url, headers={**gateway.auth(), "Last-Event-ID": "soon"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "Last-Event-ID"


def test_a_revoked_key_stops_working_within_the_cache_ttl(gateway):
    with gateway.sessions() as s:
        key = create_api_key(s, gateway.tenant)
    url, headers = f"{gateway.base_url}/jobs", gateway.auth(key)
    assert httpx.get(url, headers=headers).status_code == 200  # now remembered for SEPEN_KEY_CACHE_TTL_S=1
    with gateway.sessions() as s:
        assert revoke_api_key(s, key[:15]) == 1
    revoked = time.monotonic()
    wait_until(lambda: httpx.get(url, headers=headers).status_code == 401, 10, "the revoked key to be refused")
    # The TTL, and a few requests' time on a loaded machine: still well inside the default TTL of 10 s.
    assert time.monotonic() - revoked <= 1.0 + 5.0


# ---- webhooks at submission, and the delivery log (the in-process app) -----------------------------------


@pytest.fixture(scope="module")
def hooks_client(service_settings):
    settings = service_settings.with_(webhook_allowed_hosts=("127.0.0.1", "hooks.example.com:8443"))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_many_watchers_share_one_redis_reader(gateway, redis_client):
    """Twelve clients watching twelve jobs cost the gateway at most HUB_CONNECTIONS Redis connections (one blocked
    read for all, the others for catching up), not one each, and each still gets its own job's events as they
    happen."""
    if gateway.mode != "servers":
        pytest.skip("the embedded mode has no Redis: it polls the rows")
    jobs = [gateway.new_job() for _ in range(12)]
    streams = [stream(gateway, job.id) for job in jobs]
    for watcher in streams:
        assert watcher.wait_for(1)[0]["data"]["status"] == "queued"
    name = HUB_CLIENT_NAME.format(pid=gateway.process.pid)
    with gateway.sessions() as session:
        claims = [claim_job(session, job.id, "worker-1", lease_s=60) for job in jobs]
        for i, claim in enumerate(claims):
            heartbeat(session, claim, {"step": i + 1, "total": 20})
    for i, watcher in enumerate(streams):  # from the hub, or a quiet stream's look at the row: its own progress
        wait_until(lambda w=watcher: w.events[-1]["data"]["progress"] is not None, 10, "the progress")
        assert watcher.events[-1]["data"]["progress"] == {"step": i + 1, "total": 20}, watcher.summary()
    connections = [c for c in redis_client.client_list() if c.get("name") == name]
    assert 1 <= len(connections) <= HUB_CONNECTIONS, connections
    with gateway.sessions() as session:
        for claim in claims:
            finish_job(session, claim, "succeeded", result=generate_result(1))
    for watcher in streams:
        assert watcher.closed.wait(10)


def test_a_stream_subscribes_only_once_it_starts_and_lets_go_when_it_ends(pg_url, service_settings):
    """A response whose client leaves before its first byte is never iterated: it must hold no subscription of the
    process's hub (one taken before the stream started would stay for ever, its stream read on every round)."""
    sessions = session_factory(make_engine(pg_url))
    tenant = f"leak-{uuid.uuid4().hex[:8]}"
    with sessions() as session:
        job, _ = create_job(session, tenant, "generate", {"n": uuid.uuid4().hex})

    async def respond() -> None:
        hub = EventHub(REDIS_URL, block_ms=100)
        try:
            left = await event_stream_response(sessions, service_settings, hub, tenant, job.id, None)
            assert hub._subscriptions == {}
            await left.body_iterator.aclose()  # what the server does with a response whose client has gone
            assert hub._subscriptions == {}
            watched = await event_stream_response(sessions, service_settings, hub, tenant, job.id, None)
            assert (await anext(watched.body_iterator)).startswith(b"retry: ")
            assert list(hub._subscriptions) == [f"sepen:job-events:{job.id}"]
            await watched.body_iterator.aclose()
            assert hub._subscriptions == {}
        finally:
            await hub.close()

    asyncio.run(respond())


def test_a_service_that_allows_no_hosts_refuses_webhooks_naming_the_field(client, auth, error_of):
    body = {**GENERATE, "webhook": {"url": "http://127.0.0.1:9000/hook"}}
    response = client.post("/generate", json=body, headers=auth)
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "webhook" and "SEPEN_WEBHOOK_ALLOWED_HOSTS" in error["message"]


@pytest.mark.parametrize(
    "webhook, field, fragment",
    [
        ({"url": "http://evil.example.com/hook"}, "webhook.url", "not one this service may call"),
        ({"url": "https://hooks.example.com/hook"}, "webhook.url", "not one this service may call"),  # port 443
        ({"url": "ftp://127.0.0.1/hook"}, "webhook.url", "http:// or https://"),
        ({"url": "http://me:pw@127.0.0.1/hook"}, "webhook.url", "credentials"),
        ({"url": "http://127.0.0.1/\x00"}, "webhook.url", "control characters"),
        ({"url": "http://127.0.0.1/", "events": ["done"]}, "webhook.events.0", "Input should be"),
        ({"url": "http://127.0.0.1/", "events": ["progress", "progress"]}, "webhook.events", "once"),
        ({"url": "http://127.0.0.1/", "events": []}, "webhook.events", "at least 1"),
        ({"url": "http://127.0.0.1/", "secret": "x"}, "webhook.secret", "not a field"),
    ],
)
def test_webhook_values_are_checked(hooks_client, auth, error_of, webhook, field, fragment):
    response = hooks_client.post("/generate", json={**GENERATE, "webhook": webhook}, headers=auth)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["field"] == field and fragment in error["message"], error


def test_a_job_with_a_webhook_stores_it_and_lists_its_deliveries(hooks_client, auth, other_auth, error_of):
    finetune = {"adapter": "cat-dog", "concepts": {"pairs": [["cat", "dog"]]}}
    response = hooks_client.post(
        "/finetune",
        json={**finetune, "webhook": {"url": "https://hooks.example.com:8443/a", "events": None}},
        headers=auth,
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["request"]["webhook"] == {
        "url": "https://hooks.example.com:8443/a",
        "events": ["succeeded", "failed", "canceled"],
    }
    assert job["links"]["events"] == f"/jobs/{job['id']}/events"
    assert job["links"]["deliveries"] == f"/jobs/{job['id']}/deliveries"
    canceled = hooks_client.post(f"/jobs/{job['id']}/cancel", headers=auth)
    assert canceled.json()["status"] == "canceled"
    deliveries = hooks_client.get(job["links"]["deliveries"], headers=auth).json()["deliveries"]
    assert [(d["event"], d["seq"], d["state"], d["attempts"], d["log"]) for d in deliveries] == [
        ("canceled", 1, "pending", 0, [])
    ]
    assert deliveries[0]["url"] == "https://hooks.example.com:8443/a" and deliveries[0]["next_attempt_at"]
    assert hooks_client.get(job["links"]["deliveries"], headers=other_auth).status_code == 404

    plain = hooks_client.post("/generate", json=GENERATE, headers=auth).json()
    assert "webhook" not in plain["request"] and plain["links"]["deliveries"] is None
    assert hooks_client.get(f"/jobs/{plain['id']}/deliveries", headers=auth).json() == {"deliveries": []}


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("http://127.0.0.1/hook", True),
        ("http://127.0.0.1:65535/hook?x=1", True),
        ("https://hooks.example.com:8443/sepen", True),
        ("https://hooks.example.com/sepen", False),  # that host only on port 8443
        ("http://127.0.0.1:65536/hook", False),
        ("http://127.0.0.1.example.org/", False),
        ("http://me@127.0.0.1/hook", False),
        ("ftp://127.0.0.1/hook", False),
    ],
)
def test_the_documents_webhook_url_pattern_is_what_the_service_accepts(hooks_client, client, auth, url, accepted):
    """The OpenAPI document writes the allowed hosts into webhook.url's pattern, so a URL the schema allows is one
    the service takes (no 422 for a schema-valid request), and a service that calls no webhooks says so."""
    document = hooks_client.get("/openapi.json").json()
    pattern = document["components"]["schemas"]["WebhookIn"]["properties"]["url"]["pattern"]
    assert bool(re.search(pattern, url)) is accepted
    response = hooks_client.post("/generate", json={**GENERATE, "webhook": {"url": url}}, headers=auth)
    assert (response.status_code == 202) is accepted, response.text
    none = client.get("/openapi.json").json()["components"]["schemas"]["WebhookIn"]["properties"]["url"]
    assert none["not"] == {} and "no webhooks" in none["description"]


def test_last_event_id_is_an_integer_in_the_document(client):
    parameters = client.get("/openapi.json").json()["paths"]["/jobs/{job_id}/events"]["get"]["parameters"]
    (header,) = [p for p in parameters if p["name"] == "Last-Event-ID"]
    assert header["schema"]["type"] == "integer" and "anyOf" not in header["schema"]
