"""The worker's webhook delivery loop: a thread that takes due deliveries (sepen_store.webhooks), POSTs each signed
event to its URL (a few at a time, so one slow receiver does not hold up the others for long), and records the
attempt: delivered on a 2xx, else retried with exponential back-off until SEPEN_WEBHOOK_MAX_ATTEMPTS. Redirects are
not followed, and a host no longer allowed is not called.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from sepen_core.extras import version
from sepen_store.settings import WorkerSettings
from sepen_store.tables import utcnow
from sepen_store.webhooks import (
    SIGNATURE_HEADER,
    DueDelivery,
    backoff_s,
    record_attempt,
    signature,
    take_due_deliveries,
    tenant_key,
    url_problem,
)

log = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 65_536  # of a receiver's answer, read and dropped: only its status matters
PARALLEL = 8  # deliveries in flight at once per worker process


def body_of(payload: dict) -> bytes:
    """The bytes a delivery sends and signs: the event as compact JSON."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST and return the HTTP status (a redirect is a status like any other, not followed)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout_s, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        return response.status
    finally:
        connection.close()


def deliver(sessions: sessionmaker[Session], settings: WorkerSettings, delivery: DueDelivery) -> str:
    """One attempt of one delivery, recorded; returns the delivery's state after it."""
    started = utcnow()
    clock = time.monotonic()
    status, error = None, None
    problem = url_problem(delivery.url, settings.webhook_allowed_hosts)
    if problem is not None:
        error = f"not sent: {problem} (SEPEN_WEBHOOK_ALLOWED_HOSTS)"
    else:
        body = body_of(delivery.payload)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"sepen-webhooks/{version()}",
            "Sepen-Event": delivery.event,
            "Sepen-Delivery": delivery.id,
            SIGNATURE_HEADER: signature(tenant_key(settings.webhook_secret, delivery.tenant), int(time.time()), body),
        }
        try:
            status = post(delivery.url, body, headers, settings.webhook_timeout_s)
            if not 200 <= status < 300:
                error = f"answered {status}"
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
    duration_ms = (time.monotonic() - clock) * 1000
    tries_left = problem is None and delivery.attempt < settings.webhook_max_attempts
    retry = backoff_s(settings.webhook_backoff_s, delivery.attempt) if tries_left else None
    with sessions() as session:
        state = record_attempt(
            session,
            delivery,
            started=started,
            status=status,
            error=error,
            duration_ms=duration_ms,
            retry_after_s=retry,
        )
    if state != "delivered":
        when = f"retry in {retry:.0f} s" if state == "pending" else "giving up"
        log.warning(
            "webhook %s of job %s, attempt %d: %s; %s", delivery.event, delivery.job_id, delivery.attempt, error, when
        )
    return state


def deliver_due(sessions: sessionmaker[Session], settings: WorkerSettings, pool: ThreadPoolExecutor) -> int:
    """Take up to PARALLEL deliveries due now and attempt them at once; returns how many were attempted. Each is
    taken for longer than one attempt can last, so no other worker sends it meanwhile."""
    with sessions() as session:
        due = take_due_deliveries(session, lease_s=settings.webhook_timeout_s + 30, limit=PARALLEL)
    for future in [pool.submit(deliver, sessions, settings, delivery) for delivery in due]:
        future.result()
    return len(due)


def start_delivery_loop(sessions: sessionmaker[Session], settings: WorkerSettings) -> threading.Thread | None:
    """The loop in a daemon thread of the worker process; None when webhooks are off (no allowed hosts)."""
    if not settings.webhook_allowed_hosts:
        return None

    pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="webhook")

    def loop() -> None:
        while True:
            try:
                if deliver_due(sessions, settings, pool):
                    continue  # more may be due: look again at once
            except Exception as exc:  # noqa: BLE001 - the database may be away: try again next round
                log.warning("webhook delivery round failed: %s", exc)
            time.sleep(settings.webhook_poll_s)

    thread = threading.Thread(target=loop, name="webhooks", daemon=True)
    thread.start()
    return thread
