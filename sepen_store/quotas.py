"""Per-tenant quotas, checked before a new job is stored: jobs waiting in the queue, and compute seconds per UTC day.

Compute is what the jobs' attempts ran (jobs.compute_s, added at each heartbeat and at a job's end). A day's
use counts the jobs that finished since midnight UTC and those not finished yet; a job is never cut short by
the quota, so a tenant may end a day a little over it. The checks read before the insert: submissions racing
each other may pass a cap by the few in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from sepen_store.errors import QuotaExceeded
from sepen_store.tables import Job, utcnow

QUEUED_RETRY_AFTER_S = 30  # a guess at when a queued job will have started: the client polls again then


@dataclass(frozen=True)
class Quotas:
    """0 = unlimited."""

    max_queued_jobs: int = 0
    compute_seconds_per_day: int = 0


def day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def compute_seconds_today(session: Session, tenant: str, now: datetime | None = None) -> float:
    """Seconds the tenant's jobs ran that count against today's budget (UTC day)."""
    since = day_start(now or utcnow())
    used = session.scalar(
        select(func.coalesce(func.sum(Job.compute_s), 0.0)).where(
            Job.tenant == tenant, or_(Job.finished_at.is_(None), Job.finished_at >= since)
        )
    )
    return float(used)


def queued_jobs(session: Session, tenant: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.status == "queued"))


def check_quotas(
    session: Session, tenant: str, quotas: Quotas, *, idempotency_key: str | None = None, now: datetime | None = None
) -> None:
    """QuotaExceeded when the tenant may not queue a new job now. A retry with an Idempotency-Key that already
    made a job passes: it creates nothing."""
    if not (quotas.max_queued_jobs or quotas.compute_seconds_per_day):
        return
    if idempotency_key is not None and session.scalar(
        select(Job.id).where(Job.tenant == tenant, Job.idempotency_key == idempotency_key)
    ):
        return
    if quotas.max_queued_jobs:
        waiting = queued_jobs(session, tenant)
        if waiting >= quotas.max_queued_jobs:
            raise QuotaExceeded(
                "queued_jobs_limit",
                f"{waiting} of your jobs are queued, and at most {quotas.max_queued_jobs} may wait at a time; "
                "submit again when some have started, or cancel some",
                QUEUED_RETRY_AFTER_S,
            )
    if quotas.compute_seconds_per_day:
        now = now or utcnow()
        used = compute_seconds_today(session, tenant, now)
        if used >= quotas.compute_seconds_per_day:
            midnight = day_start(now) + timedelta(days=1)
            raise QuotaExceeded(
                "compute_quota_exceeded",
                f"your jobs have run {used:.0f} compute seconds today, and the daily budget is "
                f"{quotas.compute_seconds_per_day}; it renews at midnight UTC",
                max(1, int((midnight - now).total_seconds()) + 1),
            )
