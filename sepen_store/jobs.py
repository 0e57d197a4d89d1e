"""The job state machine and every write to a job row, each a conditional UPDATE checked in one place.

    queued ──► running ──► succeeded | failed
      │           │   └──► canceling ──► canceled (| succeeded | failed when the last step wins)
      └──► canceled   └──► queued  (abandoned: the worker's heartbeat went stale; it resumes from a checkpoint)

A worker owns a job through the attempt number its claim set: progress and the final status are
written only `WHERE attempts = :mine`, so a worker that lost its claim can no longer write.

Each write that moves a job to another status or records its progress is an event: it counts the row's event_seq
up, queues the event's webhook delivery in the same transaction, and after its commit publishes the event
(sepen_store.events) when the session's factory has a publisher.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, case, func, insert, literal, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sepen_store.contract import STATUSES, EventError, JobEvent, event_result  # noqa: F401 - STATUSES: re-exported
from sepen_store.errors import Conflict, IllegalTransition, NotFound
from sepen_store.events import publish
from sepen_store.tables import Job, UTCDateTime, seconds_between, utcnow
from sepen_store.webhooks import queue_deliveries

ACTIVE = ("running", "canceling")
TERMINAL = ("succeeded", "failed", "canceled")
TRANSITIONS = {
    "queued": {"running", "canceled"},
    "running": {"succeeded", "failed", "canceling", "queued"},
    "canceling": {"canceled", "succeeded", "failed", "queued"},
    "succeeded": set(),
    "failed": set(),
    "canceled": set(),
}


def check_transition(job: Job, wanted: str) -> None:
    if wanted not in TRANSITIONS[job.status]:
        raise IllegalTransition(job.id, job.status, wanted)


def _update_where(session: Session, job_id: str, *conditions, returning: tuple = (), **values):
    """UPDATE jobs SET values WHERE id = job_id AND conditions, committed: the one way a job row changes after
    its insert. Returns the RETURNING row (None when no row matched) or, without `returning`, the matched count."""
    statement = (
        update(Job).execution_options(synchronize_session=False).where(Job.id == job_id, *conditions).values(**values)
    )
    if returning:
        row = session.execute(statement.returning(*returning)).first()
        session.commit()
        return row
    matched = session.execute(statement).rowcount
    session.commit()
    return matched


_EVENT_COLUMNS = (Job.event_seq, Job.tenant, Job.kind, Job.status, Job.progress, Job.webhook)


def _write_event(
    session: Session,
    job_id: str,
    *conditions,
    kind_of_event: str,
    returning: tuple = (),
    event_error: EventError | None = None,
    **values,
):
    """_update_where for a write that is an event: counts event_seq up, queues the webhook delivery in the same
    transaction, commits, then publishes. Returns the RETURNING row, or None when no row matched."""
    statement = (
        update(Job)
        .execution_options(synchronize_session=False)
        .where(Job.id == job_id, *conditions)
        .values(**values, event_seq=Job.event_seq + 1)
        .returning(*_EVENT_COLUMNS, *returning)
    )
    row = session.execute(statement).first()
    if row is None:
        session.commit()
        return None
    event = JobEvent(
        seq=row.event_seq,
        type=kind_of_event,
        job_id=job_id,
        kind=row.kind,
        status=row.status,
        at=utcnow(),
        progress=row.progress,
        result=event_result(row.kind, values.get("result")),
        error=event_error,
    )
    queue_deliveries(session, row.tenant, row.webhook, event)
    session.commit()
    publish(session, event)
    return row


def request_hash(kind: str, request: dict) -> str:
    return hashlib.sha256(json.dumps({"kind": kind, "request": request}, sort_keys=True).encode()).hexdigest()


_JOBS = Job.__table__
_INSERT_JOB = insert(_JOBS).returning(*_JOBS.c)


def job_with_idempotency_key(session: Session, tenant: str, idempotency_key: str) -> Row | None:
    """The tenant's job made with this Idempotency-Key, as a row (a Core statement on the session's connection)."""
    query = select(_JOBS).where(_JOBS.c.tenant == tenant, _JOBS.c.idempotency_key == idempotency_key)
    return session.connection().execute(query).first()


def create_job(
    session: Session,
    tenant: str,
    kind: str,
    request: dict,
    *,
    idempotency_key: str | None = None,
    adapter_version_id: str | None = None,
) -> tuple[Row, bool]:
    """Insert and commit a queued job; with an idempotency key already used by this tenant, return that
    job instead (created=False), or raise Conflict if the key came with a different request. The job is a row with
    the Job's attribute names (read it again with get_job for an ORM object), written and read through Core
    statements on the session's connection: a third of the cost of the ORM's unit of work, on the gateway's path."""
    digest = request_hash(kind, request)
    if idempotency_key is not None:
        existing = job_with_idempotency_key(session, tenant, idempotency_key)
        if existing is not None:
            return _same_request(existing, digest), False
    # enqueued_at is set optimistically (the caller sends right after the commit, and clears it with
    # mark_not_enqueued if the broker refuses): one round trip less per submission. A crash between the
    # commit and the send leaves a job the reconciler re-sends once requeue_after_s has passed.
    values = {
        "tenant": tenant,
        "kind": kind,
        "request": request,
        "request_hash": digest,
        "idempotency_key": idempotency_key,
        "adapter_version_id": adapter_version_id,
        "status": "queued",
        "enqueued_at": utcnow(),
        "webhook": request.get("webhook"),
    }
    try:
        job = session.connection().execute(_INSERT_JOB, values).one()
        session.commit()
    except IntegrityError:  # a concurrent retry with the same key won the insert
        session.rollback()
        existing = job_with_idempotency_key(session, tenant, idempotency_key) if idempotency_key is not None else None
        if existing is None:
            raise
        return _same_request(existing, digest), False
    return job, True


def _same_request(job: Row, digest: str) -> Row:
    if job.request_hash != digest:
        raise Conflict(f"Idempotency-Key was already used for a different request (job {job.id})")
    return job


def get_job(session: Session, tenant: str | None, job_id: str) -> Job:
    """A job by id; with a tenant, only that tenant's (another tenant's job is NotFound, not Forbidden)."""
    job = session.get(Job, job_id, populate_existing=True)  # rows change under us: always read them fresh
    if job is None or (tenant is not None and job.tenant != tenant):
        raise NotFound("job", job_id)
    return job


def job_view(connection: Connection, tenant: str, job_id: str) -> Row:
    """get_job for reading only, at the least cost (one SELECT of the row, no ORM object): a row with the Job's
    attribute names. Meant for a connection of an autocommit engine (sepen_store.database.make_engine)."""
    row = connection.execute(select(_JOBS).where(_JOBS.c.id == job_id)).first()
    if row is None or row.tenant != tenant:
        raise NotFound("job", job_id)
    return row


_CURSOR = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{6})?\+00:00)_([0-9a-f]{32})", re.ASCII)


def list_jobs(
    session: Session,
    tenant: str,
    *,
    status: str | None = None,
    kind: str | None = None,
    cursor: str | None = None,
    limit: int = 20,
) -> tuple[list[Job], str | None]:
    """Newest first; `cursor` is the next_cursor of the previous page (keyset pagination on created_at, id)."""
    query = select(Job).where(Job.tenant == tenant)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    if cursor:
        # Only the shape next_cursor has: a UTC time and a job id (other offsets can overflow, NUL breaks Postgres).
        match = _CURSOR.fullmatch(cursor)
        try:
            after = datetime.fromisoformat(match[1]) if match else None
        except ValueError:
            after = None
        if after is None:
            raise ValueError("cursor is not one this API returned")
        last_id = match[2]
        query = query.where(or_(Job.created_at < after, and_(Job.created_at == after, Job.id < last_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = f"{rows[-1].created_at.isoformat()}_{rows[-1].id}"
    return rows, next_cursor


def mark_enqueued(session: Session, job_id: str) -> None:
    _update_where(session, job_id, enqueued_at=utcnow())


def mark_not_enqueued(session: Session, job_id: str) -> None:
    """The broker refused the job's message: let the reconciler's next round send it."""
    _update_where(session, job_id, enqueued_at=None)


def request_cancel(session: Session, tenant: str, job_id: str) -> Job:
    """Queued: canceled at once. Running: canceling, and the worker stops at its next step. Idempotent."""
    job = get_job(session, tenant, job_id)
    if job.status in ("canceling", "canceled"):
        return job
    if job.status == "queued":
        done = _write_event(
            session,
            job_id,
            Job.status == "queued",
            kind_of_event="status",
            status="canceled",
            cancel_requested=True,
            finished_at=utcnow(),
        )
    else:
        check_transition(job, "canceling")
        done = _write_event(
            session, job_id, Job.status == "running", kind_of_event="status", status="canceling", cancel_requested=True
        )
    session.refresh(job)
    if done is None and job.status not in ("canceling", "canceled"):
        raise IllegalTransition(job.id, job.status, "canceled")
    return job


@dataclass
class Claim:
    job_id: str
    attempt: int
    resumed: bool  # an earlier attempt ran (and may have left a checkpoint)
    cancel_requested: bool = False  # asked before this claim (a reclaimed job keeps its cancel request)
    tenant: str = ""  # whose job it is (the worker checks the tenant's daily compute while it runs)


def claim_job(session: Session, job_id: str, worker: str, lease_s: float) -> Claim | None:
    """Take a queued job, or one whose worker stopped heart-beating; None if another worker has it or it is done.

    A redelivered message for a job already claimed or finished is therefore a no-op. A job reclaimed while
    'canceling' stays 'canceling' (the claim's cancel_requested is set): its cancel is not forgotten.
    """
    now = utcnow()
    stale = now - timedelta(seconds=lease_s)
    claimable = or_(Job.status == "queued", and_(Job.status.in_(ACTIVE), Job.heartbeat_at < stale))
    result = _write_event(
        session,
        job_id,
        claimable,
        kind_of_event="status",
        returning=(Job.attempts, Job.cancel_requested, Job.tenant),
        status=case((Job.cancel_requested, "canceling"), else_="running"),
        attempts=Job.attempts + 1,
        worker=worker,
        started_at=now,
        heartbeat_at=now,
    )
    if result is None:
        return None
    return Claim(job_id, result.attempts, result.attempts > 1, bool(result.cancel_requested), result.tenant)


def claim_companions(
    session: Session,
    worker: str,
    lease_s: float,
    *,
    kind: str,
    exclude: str,
    limit: int,
    fits: Callable[[dict], bool],
) -> list[Claim]:
    """Up to `limit` more queued jobs of `kind` whose stored request fits(request), oldest first, each claimed as
    claim_job claims one: how a worker gathers a batch. Their messages still reach some worker later, which finds
    them claimed and drops them. fits may keep count (of images, say) and is asked only until `limit` are taken."""
    candidates = session.execute(
        select(Job.id, Job.request)
        .where(Job.kind == kind, Job.status == "queued", Job.id != exclude)
        .order_by(Job.created_at)
        .limit(limit * 4)
    ).all()
    session.commit()
    claims: list[Claim] = []
    for job_id, request in candidates:
        if len(claims) >= limit:
            break
        if fits(request):
            claim = claim_job(session, job_id, worker, lease_s)
            if claim is not None:
                claims.append(claim)
    return claims


def _owned(claim: Claim) -> tuple:
    """The conditions under which a claim still owns its job: its attempt, and a status a worker may write."""
    return Job.attempts == claim.attempt, Job.status.in_(ACTIVE)


class LostClaim(Exception):
    """This worker's attempt no longer owns the job (it was reclaimed after a stale heartbeat)."""


def _compute_until(now: datetime):
    """The job's compute_s plus the time since its attempt's last heartbeat (a claim sets heartbeat_at), in SQL."""
    return Job.compute_s + func.coalesce(seconds_between(Job.heartbeat_at, literal(now, UTCDateTime())), 0.0)


def heartbeat(session: Session, claim: Claim, progress: dict | None = None) -> bool:
    """Record progress and liveness, and add the time since the last heartbeat to the job's compute_s; returns
    True when cancellation was requested."""
    now = utcnow()
    values: dict = {"heartbeat_at": now, "compute_s": _compute_until(now)}
    if progress is None:
        row = _update_where(session, claim.job_id, *_owned(claim), returning=(Job.cancel_requested,), **values)
    else:
        row = _write_event(
            session,
            claim.job_id,
            *_owned(claim),
            kind_of_event="progress",
            returning=(Job.cancel_requested,),
            progress=progress,
            **values,
        )
    if row is None:
        raise LostClaim(claim.job_id)
    return bool(row.cancel_requested)


def finish_job(
    session: Session,
    claim: Claim,
    status: str,
    *,
    result: dict | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    progress: dict | None = None,
) -> bool:
    """Move an owned running/canceling job to a terminal status; False if the claim was lost."""
    if status not in TERMINAL:
        raise ValueError(status)
    now = utcnow()
    values: dict = {
        "status": status,
        "finished_at": now,
        "compute_s": _compute_until(now),
        "result": result,
        "error_code": error_code,
        "error_message": error_message,
    }
    if progress is not None:
        values["progress"] = progress
    error = EventError(code=error_code, message=error_message or "") if error_code else None
    row = _write_event(session, claim.job_id, *_owned(claim), kind_of_event="status", event_error=error, **values)
    return row is not None


def _resend_due(requeue_after_s: float, lease_s: float):
    """Jobs whose broker message may be lost: queued and never sent or sent long ago, or running with a stale
    heartbeat and not re-sent since it went stale."""
    now = utcnow()
    waited = now - timedelta(seconds=requeue_after_s)
    stale = now - timedelta(seconds=lease_s)
    return or_(
        and_(Job.status == "queued", or_(Job.enqueued_at.is_(None), Job.enqueued_at < waited)),
        and_(Job.status.in_(ACTIVE), Job.heartbeat_at < stale, or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale)),
    )


def take_resends(
    session: Session, *, requeue_after_s: float, lease_s: float, limit: int = 500
) -> list[tuple[str, str, str]]:
    """(id, kind, status) of the jobs due for a re-send (oldest first), each taken by a conditional update of its
    enqueued_at: across all workers' reconcilers a job is taken at most once per period. The taker sends its
    message, or decides it is still in the broker, or calls mark_not_enqueued if the send fails."""
    due = list(
        session.execute(
            select(Job.id).where(_resend_due(requeue_after_s, lease_s)).order_by(Job.created_at).limit(limit)
        ).scalars()
    )
    taken = []
    for job_id in due:
        row = _update_where(
            session,
            job_id,
            _resend_due(requeue_after_s, lease_s),
            returning=(Job.kind, Job.status),
            enqueued_at=utcnow(),
        )
        if row is not None:
            taken.append((job_id, row.kind, row.status))
    return taken
