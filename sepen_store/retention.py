"""Retention: the images and heatmaps of jobs that finished long ago, and the checkpoints no job will resume, deleted
with their blobs (the rows at once, the objects in the bucket after each commit). Job rows and adapters stay: an
adapter version is deleted only when someone deletes it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from sepen_store.blobs import delete_blobs
from sepen_store.jobs import TERMINAL
from sepen_store.quotas import COMPUTE_QUOTA_EXCEEDED
from sepen_store.tables import Checkpoint, Job, JobImage, utcnow

BATCH = 500  # rows per transaction: a first run over a large backlog holds no long lock
# A finetune stopped by its tenant's compute quota: the same request resumes from its checkpoint, kept for the days.
_resumable = Job.error_code.is_not_distinct_from(COMPUTE_QUOTA_EXCEEDED)


@dataclass(frozen=True)
class Removed:
    images: int  # images and heatmaps
    checkpoints: int


def apply_retention(
    session: Session, *, image_days: float, checkpoint_days: float, now: datetime | None = None
) -> Removed:
    """Delete the images and heatmaps of jobs finished more than `image_days` ago, and the checkpoints not written
    for `checkpoint_days` or whose job has finished, unless the quota stopped it (0 days: that kind is kept for
    ever); commits each batch."""
    now = now or utcnow()
    images = checkpoints = 0
    if image_days > 0:
        finished_before = now - timedelta(days=image_days)
        images = _delete_with_blobs(
            session,
            select(JobImage.id, JobImage.blob_id)
            .join(Job, Job.id == JobImage.job_id)
            .where(Job.finished_at < finished_before),
            JobImage.id,
        )
    if checkpoint_days > 0:
        written_before = now - timedelta(days=checkpoint_days)
        checkpoints = _delete_with_blobs(
            session,
            select(Checkpoint.job_id, Checkpoint.blob_id)
            .join(Job, Job.id == Checkpoint.job_id)
            .where(or_(Checkpoint.updated_at < written_before, and_(Job.status.in_(TERMINAL), ~_resumable))),
            Checkpoint.job_id,
        )
    return Removed(images, checkpoints)


def _delete_with_blobs(session: Session, query, key) -> int:
    """Delete the rows `query` selects (their `key` first, then their blob_id) and their blobs, a batch per commit."""
    removed = 0
    while rows := session.execute(query.limit(BATCH)).all():
        session.execute(delete(key.class_).where(key.in_([row[0] for row in rows])))
        delete_blobs(session, [row.blob_id for row in rows])
        session.commit()
        removed += len(rows)
    return removed
