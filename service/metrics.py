"""The gateway's Prometheus metrics at GET /metrics (text exposition format, left out of the OpenAPI document):
requests by route template and status, counted by a middleware, and, read through sepen_store at each scrape,
jobs by kind and status and the messages waiting in each queue.

Open like /healthz unless SEPEN_METRICS_TOKEN is set; it names no tenant, key or job. Each gateway process counts
its own requests (a scrape reaches one process); the job and queue gauges are the same from every process.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable, Iterator

from celery import Celery
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sepen_store.metrics import job_counts, queue_depths
from service.errors import BEARER_CHALLENGE, ApiError

logger = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)  # text/plain for Prometheus, not part of the JSON API
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
UNMATCHED = "unmatched"  # the route label of a path no route matches (never the raw path: it may hold ids)


class GatewayMetrics:
    """One gateway's metrics in a registry of its own (several apps in one process, as in tests, never clash)."""

    def __init__(self, sessions: sessionmaker[Session], celery: Celery):
        self.registry = CollectorRegistry()
        labels = ("method", "route", "status")
        self.requests = Counter(
            "sepen_http_requests",
            "HTTP requests answered, by route template and status",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "sepen_http_request_duration_seconds",
            "seconds from a request's arrival to its response's status line (a stream's first byte, not its end)",
            labels,
            registry=self.registry,
        )
        self.registry.register(StoreCollector(sessions, celery))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method if method in METHODS else "other", route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StoreCollector(Collector):
    """Jobs by kind and status and each queue's waiting messages, read when scraped. A source that does not answer
    leaves its samples out and shows sepen_metrics_source_up{source} 0; the scrape itself still succeeds."""

    def __init__(self, sessions: sessionmaker[Session], celery: Celery):
        self.sessions = sessions
        self.celery = celery

    def describe(self) -> Iterable[Metric]:
        return self._families()  # without samples: registering the collector reads neither database nor broker

    def collect(self) -> Iterator[Metric]:
        jobs, queues, up = self._families()
        try:
            with self.sessions() as session:
                counts = job_counts(session)
        except Exception as exc:  # noqa: BLE001 - a scrape during an outage reports it instead of failing
            logger.warning("metrics: the database did not answer: %s: %s", type(exc).__name__, exc)
            up.add_metric(["database"], 0)
        else:
            for (kind, status), count in counts.items():
                jobs.add_metric([kind, status], count)
            up.add_metric(["database"], 1)
        try:
            depths = queue_depths(self.celery)
        except Exception as exc:  # noqa: BLE001
            logger.warning("metrics: the broker did not answer: %s: %s", type(exc).__name__, exc)
            up.add_metric(["broker"], 0)
        else:
            for queue, depth in (depths or {}).items():
                queues.add_metric([queue], depth)
            up.add_metric(["broker"], 1 if depths is not None else 0)
        yield from (jobs, queues, up)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("sepen_jobs", "jobs in the database by kind and status", labels=["kind", "status"]),
            GaugeMetricFamily("sepen_queue_depth", "messages waiting in the broker's queue", labels=["queue"]),
            GaugeMetricFamily(
                "sepen_metrics_source_up",
                "1 when this scrape could read the source (database, broker)",
                labels=["source"],
            ),
        )


def route_template(scope: Scope) -> str:
    """The path template of the route that answered ("/jobs/{job_id}"), set in the scope by the router."""
    return getattr(scope.get("route"), "path", None) or UNMATCHED


class RequestMetrics:
    """Counts every HTTP answer, errors included (it wraps the app's other middleware), and times it to its
    status line."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered: list = []  # (status, seconds) once the status line is sent

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered.append((message["status"], time.perf_counter() - started))
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            status, seconds = answered[0] if answered else (500, time.perf_counter() - started)
            self.metrics.observe(scope["method"], route_template(scope), status, seconds)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    token = request.app.state.settings.metrics_token
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "GET /metrics needs 'Authorization: Bearer <SEPEN_METRICS_TOKEN>'",
                headers=BEARER_CHALLENGE,
            )
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
