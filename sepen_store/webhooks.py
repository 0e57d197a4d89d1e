"""Webhooks: which URLs a job may call, how a delivery is signed, and the deliveries' rows (queued with the job write
that made their event, taken by one worker at a time, retried with exponential back-off, every attempt logged).

Signature. Each request carries `Sepen-Signature: t=<unix seconds>,v1=<hex>`, where hex is
HMAC-SHA256(key, f"{t}." + raw body) and key is the tenant's webhook key, `tenant_key(SEPEN_WEBHOOK_SECRET, tenant)`
(`sepen-admin webhook-key --tenant NAME` prints it). A receiver recomputes it over the bytes it received, compares
in constant time, and refuses a t more than a few minutes old (`verify_signature` does all three).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from sepen_store.contract import JobEvent
from sepen_store.tables import WebhookDelivery, utcnow

SIGNATURE_HEADER = "Sepen-Signature"
SIGNATURE_TOLERANCE_S = 300
MAX_BACKOFF_S = 3600.0
MAX_LOGGED_ERROR = 300


def url_problem(url: str, allowed_hosts: tuple[str, ...]) -> str | None:
    """Why a job may not call `url` (a message saying what to change), or None when it may: http or https, no
    credentials, and a host (or host:port) of the allowed ones."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a URL this service can call ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@); authenticate the service by its signature"
    host = parts.hostname.lower()
    if host not in allowed_hosts and f"{host}:{port or _default_port(parts.scheme)}" not in allowed_hosts:
        return f"host {host!r} is not one this service may call; allowed: {', '.join(allowed_hosts)}"
    return None


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def tenant_key(secret: str, tenant: str) -> str:
    """The key a tenant's webhook deliveries are signed with, derived from the service's secret, so that no tenant
    can sign for another."""
    return hmac.new(secret.encode(), f"sepen-webhook:{tenant}".encode(), hashlib.sha256).hexdigest()


def signature(key: str, timestamp: int, body: bytes) -> str:
    """The Sepen-Signature header's value for `body` sent at `timestamp`."""
    digest = hmac.new(key.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    key: str, header: str, body: bytes, *, tolerance_s: float = SIGNATURE_TOLERANCE_S, now: float | None = None
) -> bool:
    """What a receiver does: the header's HMAC matches `body` under `key`, and its time is recent."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = signature(key, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


# ---- deliveries ----------------------------------------------------------------------------------


def queue_deliveries(session: Session, tenant: str, webhook: dict | None, event: JobEvent) -> None:
    """Add the event's delivery to the session when the job's webhook asked for it (the caller commits, with the
    job write that made the event). Progress coalesces: a progress delivery not yet tried takes the newer report."""
    if not webhook or event.name not in webhook.get("events", ()):
        return
    payload = event.model_dump(mode="json")
    if event.type == "progress":
        waiting = session.execute(
            update(WebhookDelivery)
            .execution_options(synchronize_session=False)
            .where(
                WebhookDelivery.job_id == event.job_id,
                WebhookDelivery.event == "progress",
                WebhookDelivery.state == "pending",
                WebhookDelivery.attempts == 0,
            )
            .values(payload=payload, event_seq=event.seq)
        ).rowcount
        if waiting:
            return
    session.add(
        WebhookDelivery(
            job_id=event.job_id,
            tenant=tenant,
            url=webhook["url"],
            event=event.name,
            event_seq=event.seq,
            payload=payload,
            state="pending",
            attempts=0,
            next_attempt_at=utcnow(),
            log=[],
        )
    )


@dataclass(frozen=True)
class DueDelivery:
    id: str
    job_id: str
    tenant: str
    url: str
    event: str
    payload: dict
    attempt: int  # this attempt's number, from 1


def take_due_deliveries(session: Session, *, lease_s: float, limit: int = 20) -> list[DueDelivery]:
    """Pending deliveries whose time has come, each taken with a conditional update that pushes its next attempt
    `lease_s` ahead: across all workers one takes it, and if that worker dies another retries it after the lease."""
    now = utcnow()
    due = list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.event_seq)
            .limit(limit)
        )
    )
    taken = []
    for delivery_id in due:
        row = session.execute(
            update(WebhookDelivery)
            .execution_options(synchronize_session=False)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.state == "pending",
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=now + timedelta(seconds=lease_s))
            .returning(
                WebhookDelivery.job_id,
                WebhookDelivery.tenant,
                WebhookDelivery.url,
                WebhookDelivery.event,
                WebhookDelivery.payload,
                WebhookDelivery.attempts,
            )
        ).first()
        session.commit()
        if row is not None:
            taken.append(DueDelivery(delivery_id, *row))
    return taken


def backoff_s(first_s: float, attempt: int) -> float:
    """The wait after failed attempt number `attempt`: first_s, then twice as long each time, at most an hour."""
    return min(MAX_BACKOFF_S, first_s * 2 ** (attempt - 1))


def record_attempt(
    session: Session,
    delivery: DueDelivery,
    *,
    started: datetime,
    status: int | None,
    error: str | None,
    duration_ms: float,
    retry_after_s: float | None,
) -> str:
    """Log one attempt: delivered on a 2xx; else retried after `retry_after_s`, or failed when that is None (no
    tries left). Returns the delivery's state."""
    delivered = status is not None and 200 <= status < 300
    state = "delivered" if delivered else "pending" if retry_after_s is not None else "failed"
    row = session.get(WebhookDelivery, delivery.id, populate_existing=True)
    if row is None or row.attempts != delivery.attempt or row.state != "pending":
        session.rollback()
        return row.state if row is not None else "failed"  # another worker's attempt took over (a lease ran out)
    entry = {
        "at": started.isoformat(),
        "status": status,
        "error": error[:MAX_LOGGED_ERROR] if error else None,
        "duration_ms": round(duration_ms, 1),
    }
    row.log = [*row.log, entry]
    row.last_status = status
    row.state = state
    if state == "pending":
        row.next_attempt_at = utcnow() + timedelta(seconds=retry_after_s)
    else:
        row.finished_at = utcnow()
    session.commit()
    return state


def job_deliveries(session: Session, job_id: str, *, limit: int = 50) -> list[WebhookDelivery]:
    """A job's deliveries, newest event first (the caller has checked the job is the tenant's)."""
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.event_seq.desc(), WebhookDelivery.created_at.desc())
        .limit(limit)
    )
    return list(session.scalars(query))
