"""Rate limits and quotas: requests per API key and minute (429, Retry-After, RateLimit-* headers), shared by gateway
processes through Redis or counted in memory without it; per tenant, a cap on queued jobs and a compute budget per
UTC day. Each refusal stores nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from sepen_store.jobs import claim_job, create_job, finish_job, list_jobs
from sepen_store.rate_limits import KEY_PREFIX, WINDOW_S, RateLimiter, shared_counter_url
from sepen_store.tables import Job, utcnow
from service.app import create_app
from tests.service.conftest import REDIS_URL, swapped_rate_limiter

NOW = 60_000_030.0  # 30 s into a window: a fixed clock never meets the window's edge mid-test
FINETUNE = {"adapter": "cat-dog", "concepts": {"pairs": [["cat", "dog"]]}}


def fixed_clock() -> float:
    return NOW


@pytest.fixture
def limited(client):
    """The service with 3 requests per key and minute, counted in Redis."""
    limiter = RateLimiter(3, shared_counter_url(REDIS_URL), clock=fixed_clock)
    with swapped_rate_limiter(client, limiter) as limited_client:
        yield limited_client


def test_past_the_rate_limit_is_429_with_retry_after(limited, auth, other_auth, error_of):
    answers = [limited.get("/jobs", headers=auth) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["ratelimit-remaining"] for a in answers] == ["2", "1", "0"]
    # 30 s into the window: what it counted weighs on through the next one, 90 s in all.
    assert all(a.headers["ratelimit-limit"] == "3" and a.headers["ratelimit-reset"] == "90" for a in answers)
    refused = limited.post("/finetune", json=FINETUNE, headers=auth)
    assert refused.status_code == 429
    # 4 counted: one more fits once they weigh 2, halfway into the next window, 60 s from now.
    assert refused.headers["retry-after"] == "60" and refused.headers["ratelimit-remaining"] == "0"
    error = error_of(refused)
    assert error["code"] == "rate_limited" and "3 requests" in error["message"]
    assert limited.get("/jobs", headers=other_auth).status_code == 200  # per key: another key has its own window


def test_errors_after_authentication_are_counted_and_carry_the_headers(limited, auth):
    missing = limited.get(f"/jobs/{'0' * 32}", headers=auth)
    assert missing.status_code == 404 and missing.headers["ratelimit-remaining"] == "2"


def test_requests_without_a_valid_key_are_not_counted(limited, auth):
    for _ in range(5):
        assert limited.get("/jobs", headers={"Authorization": "Bearer sk_sepen_nope"}).status_code == 401
    assert limited.get("/jobs", headers=auth).headers["ratelimit-remaining"] == "2"


def test_gateway_processes_share_the_count_through_redis(service_settings, auth, redis_client):
    """Two apps (as two uvicorn workers would be) against the same Redis: together they allow the limit once."""
    apps = [create_app(service_settings), create_app(service_settings)]
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        limiters = [RateLimiter(4, shared_counter_url(REDIS_URL), clock=fixed_clock) for _ in apps]
        with swapped_rate_limiter(first, limiters[0]), swapped_rate_limiter(second, limiters[1]):
            statuses = [(first if i % 2 else second).get("/jobs", headers=auth).status_code for i in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]
    window = int(NOW // WINDOW_S)
    counters = redis_client.keys(f"{KEY_PREFIX}:*:{window}")
    assert counters and 0 < redis_client.ttl(counters[0]) <= 2 * WINDOW_S


def test_the_embedded_mode_counts_in_memory(service_settings, api_key, tmp_path):
    settings = service_settings.with_(broker_url="", data_dir=tmp_path, rate_limit_per_minute=2)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.rate_limiter.redis is None
        auth = {"Authorization": f"Bearer {api_key}"}
        limiter = RateLimiter(2, None, clock=fixed_clock)
        with swapped_rate_limiter(client, limiter):
            assert [client.get("/models", headers=auth).status_code for _ in range(3)] == [200, 200, 429]


def test_the_window_slides(redis_client):
    now = [NOW]
    limiter = RateLimiter(1, shared_counter_url(REDIS_URL), clock=lambda: now[0])
    try:
        assert limiter.hit("slide-test").allowed and not limiter.hit("slide-test").allowed
        now[0] += WINDOW_S  # the two requests of the last window still weigh one (half of them)
        assert not limiter.hit("slide-test").allowed
        now[0] += 2 * WINDOW_S
        decision = limiter.hit("slide-test")
        assert decision.allowed and decision.remaining == 0 and decision.reset_s == 90
    finally:
        limiter.close()


@pytest.mark.parametrize("redis_url", [REDIS_URL, None], ids=["redis", "memory"])
def test_no_window_edge_lets_more_than_the_limit_through(redis_client, redis_url):
    """600 a minute: a client sending 100 requests a second from 6 s before a minute's edge to 6 s after it gets its
    600 through in the first 6 s and after the edge only what the minute's sliding frees (a tenth of 600 in 6 s),
    where a fixed window let 600 more through. Refused requests do not count: a client just over the limit is
    slowed to it, not shut out."""
    now = [NOW + 24.0]  # 6 s before the edge
    limiter = RateLimiter(600, shared_counter_url(redis_url) if redis_url else None, clock=lambda: now[0])
    try:
        allowed_at = []
        while now[0] < NOW + 36.0:
            if limiter.hit(f"edge-{redis_url is None}").allowed:
                allowed_at.append(now[0])
            now[0] += 0.01  # 100 requests a second
        assert 600 <= len(allowed_at) <= 661, len(allowed_at)
        assert sum(t < NOW + 30.0 for t in allowed_at) == 600  # all of the first minute's, before the edge
    finally:
        limiter.close()


def test_zero_means_no_limit_and_no_headers(service_settings, api_key):
    with TestClient(create_app(service_settings.with_(rate_limit_per_minute=0))) as client:
        response = client.get("/jobs", headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 200 and "ratelimit-limit" not in response.headers


# ---- quotas --------------------------------------------------------------------------------------


@pytest.fixture
def capped(service_settings):
    """The service with at most 2 queued jobs and 100 compute seconds a day per tenant."""
    settings = service_settings.with_(max_queued_jobs_per_tenant=2, compute_seconds_per_day=100)
    with TestClient(create_app(settings)) as client:
        yield client


def test_queued_jobs_beyond_the_cap_are_429_naming_it(capped, auth, tenant, db, error_of):
    first = capped.post("/finetune", json=FINETUNE, headers={**auth, "Idempotency-Key": "first"})
    assert first.status_code == 202
    assert capped.post("/generate", json={"prompt": "a cat"}, headers=auth).status_code == 202
    refused = capped.post("/finetune", json=FINETUNE, headers=auth)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    error = error_of(refused)
    assert error["code"] == "queued_jobs_limit" and "at most 2" in error["message"]
    assert len(list_jobs(db, tenant)[0]) == 2  # the refused one stored nothing
    # A retry of a job already stored creates nothing, so the cap does not refuse it.
    replay = capped.post("/finetune", json=FINETUNE, headers={**auth, "Idempotency-Key": "first"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    capped.post(f"/jobs/{first.json()['id']}/cancel", headers=auth)
    assert capped.post("/finetune", json=FINETUNE, headers=auth).status_code == 202  # room again


def _ran(db, tenant: str, seconds: float, *, finished_days_ago: int = 0) -> Job:
    """A job of `tenant` that a worker ran for `seconds` (its heartbeat set back by as much) and finished."""
    job, _ = create_job(db, tenant, "generate", {"prompt": "a cat"})
    claim = claim_job(db, job.id, "test-worker", lease_s=60)
    row = db.get(Job, job.id)
    row.heartbeat_at = utcnow() - timedelta(seconds=seconds)
    db.commit()
    assert finish_job(db, claim, "succeeded", result=None)
    if finished_days_ago:
        row.finished_at = utcnow() - timedelta(days=finished_days_ago)
        db.commit()
    db.refresh(row)
    return row


def test_a_tenant_over_its_daily_compute_gets_429_until_midnight_utc(capped, auth, tenant, other_auth, db, error_of):
    _ran(db, tenant, 500, finished_days_ago=1)  # yesterday's compute does not count today
    assert capped.post("/generate", json={"prompt": "a cat"}, headers=auth).status_code == 202
    assert _ran(db, tenant, 120).compute_s == pytest.approx(120, abs=2)
    refused = capped.post("/generate", json={"prompt": "a cat"}, headers=auth)
    assert refused.status_code == 429
    error = error_of(refused)
    assert error["code"] == "compute_quota_exceeded" and "100" in error["message"]
    now = utcnow()
    to_midnight = (now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1) - now).total_seconds()
    assert abs(int(refused.headers["retry-after"]) - to_midnight) < 5
    assert capped.post("/generate", json={"prompt": "a cat"}, headers=other_auth).status_code == 202  # per tenant
