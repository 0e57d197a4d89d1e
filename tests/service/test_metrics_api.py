"""GET /metrics in the gateway: Prometheus text left out of the OpenAPI document, requests counted under their route
template whatever the answer, and a scrape that still answers while the database or the broker is down, saying
which one in sepen_metrics_source_up; FastAPI's OpenTelemetry spans only with SEPEN_OPENTELEMETRY."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app


def scrape(client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain"), response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def count(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_is_not_in_the_openapi_document(client):
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_requests_count_under_their_route_template_and_status(client, auth):
    before = scrape(client)
    bad_id = "not-a-job-id"
    assert client.get(f"/jobs/{bad_id}", headers=auth).status_code == 422
    assert client.get("/jobs/0123456789abcdef0123456789abcdef", headers=auth).status_code == 404
    assert client.get("/no/such/path/0123").status_code == 404
    assert client.delete("/healthz").status_code == 405
    after = scrape(client)
    for labels in (
        {"method": "GET", "route": "/jobs/{job_id}", "status": "422"},
        {"method": "GET", "route": "/jobs/{job_id}", "status": "404"},
        {"method": "GET", "route": "unmatched", "status": "404"},
        {"method": "DELETE", "route": "/healthz", "status": "405"},
        {"method": "GET", "route": "/metrics", "status": "200"},
    ):
        assert (
            count(after, "sepen_http_requests_total", **labels) - count(before, "sepen_http_requests_total", **labels)
            == 1
        ), labels
        assert count(after, "sepen_http_request_duration_seconds_count", **labels) >= 1, labels
    routes = {dict(labels).get("route") for name, labels in after if name == "sepen_http_requests_total"}
    assert not any(bad_id in route or "0123" in route for route in routes), routes


def test_a_scrape_answers_while_the_broker_is_down(down_client):
    samples = scrape(down_client)
    assert count(samples, "sepen_metrics_source_up", source="broker") == 0
    assert count(samples, "sepen_metrics_source_up", source="database") == 1
    assert not [name for name, _ in samples if name == "sepen_queue_depth"]
    assert [name for name, _ in samples if name == "sepen_jobs"]


def test_a_scrape_answers_while_the_database_is_down(db_down_client):
    samples = scrape(db_down_client)
    assert count(samples, "sepen_metrics_source_up", source="database") == 0
    assert count(samples, "sepen_metrics_source_up", source="broker") == 1
    assert not [name for name, _ in samples if name == "sepen_jobs"]


class RecordingTracerProvider(trace.TracerProvider):  # not a NoOpTracerProvider: FastAPI skips those
    """An OpenTelemetry tracer provider that notes the path of every span started through it."""

    def __init__(self):
        self.spans: list[str] = []

    def get_tracer(self, *args, **kwargs):
        provider = self

        class Tracer(trace.NoOpTracer):
            def start_span(self, name, *args, **kwargs):
                provider.spans.append((kwargs.get("attributes") or {}).get("url.path", name))
                return super().start_span(name, *args, **kwargs)

        return Tracer()


@pytest.mark.parametrize("enabled", [True, False])
def test_opentelemetry_spans_only_when_asked(service_settings, monkeypatch, enabled):
    provider = RecordingTracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)  # as if an OpenTelemetry SDK were set up
    with TestClient(create_app(service_settings.with_(opentelemetry=enabled))) as client:
        assert client.get("/healthz").status_code == 200
    assert ("/healthz" in provider.spans) is enabled and (provider.spans == []) is not enabled, provider.spans
