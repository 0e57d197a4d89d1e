"""Per-tenant quotas, checked before a new job is stored: jobs waiting in the queue, and compute seconds per UTC day.

Compute is what the jobs' attempts ran (jobs.compute_s, added at each heartbeat and at a job's end). A day's
use counts the jobs that finished since midnight UTC and those not finished yet. A worker stops a running job once
its tenant's day passes the budget (over_compute_quota, checked every QUOTA_CHECK_S while it runs): the job fails
with COMPUTE_QUOTA_EXCEEDED, and a finetune's checkpoint is kept, so the same request resumes from it. The checks
read before the insert: submissions racing each other may pass a cap by the few in flight.

Both are read in one statement, each through an index, and neither reads more rows than it must: the queued
count stops at the cap, and the day's sum leaves out queued jobs, which have run nothing (compute_s grows only
while a claim holds the job: running or canceling).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Integer, bindparam, func, or_, select
from sqlalchemy.orm import Session

from sepen_store.errors import QuotaExceeded
from sepen_store.jobs import ACTIVE, job_with_idempotency_key
from sepen_store.tables import Job, utcnow

QUEUED_RETRY_AFTER_S = 30  # a guess at when a queued job will have started: the client polls again then
COMPUTE_QUOTA_EXCEEDED = "compute_quota_exceeded"  # the error code of a refused submission and of a stopped job
QUOTA_CHECK_S = 15.0  # how often a worker compares a running job's tenant's day with the budget


@dataclass(frozen=True)
class Quotas:
    """0 = unlimited."""

    max_queued_jobs: int = 0
    compute_seconds_per_day: int = 0


def day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _compute_today(tenant, since):
    """The seconds the tenant's jobs ran that count against the day that began at `since`: those finished since,
    and those running (a queued job has run nothing)."""
    # status = each ACTIVE one, not IN (ACTIVE): an IN list's parameters are rendered again at every execution.
    return select(func.coalesce(func.sum(Job.compute_s), 0.0)).where(
        Job.tenant == tenant,
        or_(*(Job.status == status for status in ACTIVE), Job.finished_at >= since),
    )


def _queued(tenant, at_most=None):
    """The number of the tenant's queued jobs, counted up to `at_most` (None: all)."""
    waiting = select(Job.id).where(Job.tenant == tenant, Job.status == "queued")
    if at_most is not None:
        waiting = waiting.limit(at_most)
    return select(func.count()).select_from(waiting.subquery())


# Both counts of check_quotas in one statement, built once (building it costs more than running it): a tenant's
# queued jobs up to :cap (0 counts nothing), and its compute since :since.
_USAGE = select(
    _queued(bindparam("tenant"), bindparam("cap", type_=Integer)).scalar_subquery(),
    _compute_today(bindparam("tenant"), bindparam("since")).scalar_subquery(),
)


def compute_seconds_today(session: Session, tenant: str, now: datetime | None = None) -> float:
    """Seconds the tenant's jobs ran that count against today's budget (UTC day)."""
    return float(session.scalar(_compute_today(tenant, day_start(now or utcnow()))))


def over_compute_quota(session: Session, tenant: str, per_day: int, now: datetime | None = None) -> bool:
    """Whether the tenant's jobs have run `per_day` compute seconds or more today (never with per_day 0)."""
    return bool(per_day) and compute_seconds_today(session, tenant, now) >= per_day


def queued_jobs(session: Session, tenant: str) -> int:
    return session.scalar(_queued(tenant))


def check_quotas(
    session: Session, tenant: str, quotas: Quotas, *, idempotency_key: str | None = None, now: datetime | None = None
) -> None:
    """QuotaExceeded when the tenant may not queue a new job now. A retry with an Idempotency-Key that already
    made a job passes: it creates nothing."""
    if not (quotas.max_queued_jobs or quotas.compute_seconds_per_day):
        return
    if idempotency_key is not None and job_with_idempotency_key(session, tenant, idempotency_key) is not None:
        return
    now = now or utcnow()
    usage = {"tenant": tenant, "cap": quotas.max_queued_jobs, "since": day_start(now)}
    # On the session's connection: the ORM's execute path would cost more than the statement.
    waiting, used = session.connection().execute(_USAGE, usage).one()
    if quotas.max_queued_jobs:
        if waiting >= quotas.max_queued_jobs:
            raise QuotaExceeded(
                "queued_jobs_limit",
                f"{waiting} of your jobs are queued, and at most {quotas.max_queued_jobs} may wait at a time; "
                "submit again when some have started, or cancel some",
                QUEUED_RETRY_AFTER_S,
            )
    if quotas.compute_seconds_per_day:
        if used >= quotas.compute_seconds_per_day:
            midnight = day_start(now) + timedelta(days=1)
            raise QuotaExceeded(
                COMPUTE_QUOTA_EXCEEDED,
                f"your jobs have run {used:.0f} compute seconds today, and the daily budget is "
                f"{quotas.compute_seconds_per_day}; it renews at midnight UTC",
                max(1, int((midnight - now).total_seconds()) + 1),
            )
