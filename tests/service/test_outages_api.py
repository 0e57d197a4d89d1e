"""Degrade, don't fail: with the database down every route that needs it answers 503 with Retry-After in the error
shape; /readyz names the dependency that is down and nothing of the driver's message; a broker outage still
accepts jobs (the reconciler sends them) and the rate limit counts in memory meanwhile."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from sepen_store.rate_limits import RateLimiter, shared_counter_url
from service.app import create_app
from tests.service.conftest import CLOSED_BROKER_URL, CLOSED_DATABASE_URL, swapped_rate_limiter

NEEDS_DATABASE = [
    ("POST", "/finetune", {"adapter": "cat-dog", "concepts": {"pairs": [["cat", "dog"]]}}),
    ("POST", "/generate", {"prompt": "a cat"}),
    ("GET", "/jobs", None),
    ("GET", f"/jobs/{'0' * 32}", None),
    ("POST", f"/jobs/{'0' * 32}/cancel", None),
    ("GET", f"/jobs/{'0' * 32}/images/0", None),
    ("GET", "/adapters", None),
    ("GET", "/adapters/cat-dog", None),
    ("GET", "/adapters/cat-dog/1/weights", None),
    ("DELETE", "/adapters/cat-dog/1", None),
    ("GET", "/models", None),
]
# What a driver's message would leak: the host, the port, the driver, the exception class.
DRIVER_TEXT = ("127.0.0.1", "5499", "6390", "psycopg", "OperationalError", "redis://", "Connection refused")


def _no_driver_text(text: str) -> None:
    leaked = [word for word in DRIVER_TEXT if word in text]
    assert not leaked, f"the answer shows {leaked}: {text}"


@pytest.mark.parametrize("method, url, body", NEEDS_DATABASE, ids=[f"{m} {u}" for m, u, _ in NEEDS_DATABASE])
def test_database_down_is_503_with_retry_after(db_down_client, error_of, method, url, body):
    response = db_down_client.request(method, url, json=body, headers={"Authorization": "Bearer sk_sepen_any"})
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    error = error_of(response)
    assert error["code"] == "database_unavailable" and "database" in error["message"]
    _no_driver_text(response.text)


def test_liveness_and_the_contract_need_no_database(db_down_client):
    assert db_down_client.get("/healthz").status_code == 200
    assert db_down_client.get("/openapi.json").status_code == 200


def test_readyz_names_a_database_that_is_down_without_driver_text(db_down_client):
    response = db_down_client.get("/readyz")
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
    body = response.json()
    assert body["checks"] == {"database": "unavailable", "broker": "ok"}
    assert body["error"]["code"] == "not_ready" and body["error"]["message"] == "database is not answering"
    _no_driver_text(response.text)


def test_readyz_names_a_broker_that_is_down_without_driver_text(down_client):
    response = down_client.get("/readyz")
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
    body = response.json()
    assert body["checks"] == {"database": "ok", "broker": "unavailable"}
    assert body["error"]["message"] == "broker is not answering"
    _no_driver_text(response.text)


def test_readyz_names_both_when_both_are_down(service_settings):
    settings = service_settings.with_(database_url=CLOSED_DATABASE_URL, broker_url=CLOSED_BROKER_URL)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "unavailable", "broker": "unavailable"}
    assert response.json()["error"]["message"] == "database and broker are not answering"


def test_broker_down_the_rate_limit_counts_in_memory(down_client, api_key, error_of):
    limiter = RateLimiter(3, shared_counter_url(CLOSED_BROKER_URL), clock=lambda: 60_000_030.0)  # no window edge
    assert limiter.redis is not None  # it tries the broker's Redis, finds it down, and counts in memory
    with swapped_rate_limiter(down_client, limiter) as client:
        auth = {"Authorization": f"Bearer {api_key}"}
        statuses = [client.get("/jobs", headers=auth).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        limited = client.get("/jobs", headers=auth)
        assert error_of(limited)["code"] == "rate_limited" and int(limited.headers["retry-after"]) > 0
        job = client.post("/generate", json={"prompt": "a cat"}, headers=auth)
        assert job.status_code == 429  # still the same key's window
