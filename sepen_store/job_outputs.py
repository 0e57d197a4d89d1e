"""What a job leaves besides its row: a generate job's images and heatmaps, a running finetune's latest checkpoint (kept
after the job when its tenant's compute quota stopped it, for the same request to resume)."""

from __future__ import annotations

import logging

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from sepen_store.blobs import blob_bytes, delete_blob, delete_blobs, get_blob, put_blob, rewrite_blob
from sepen_store.errors import NotFound
from sepen_store.quotas import COMPUTE_QUOTA_EXCEEDED
from sepen_store.tables import Blob, Checkpoint, Job, JobImage, new_id, utcnow

log = logging.getLogger(__name__)

IMAGE_KINDS = ("image", "heatmap")
CHECKPOINT_CONTENT_TYPE = "application/x-tar"


def replace_images(session: Session, job_id: str, pngs: list[tuple[str, int, bytes]]) -> None:
    """Store a job's (kind, index, PNG bytes), replacing whatever an earlier attempt of the job stored; commits."""
    old = session.execute(select(JobImage.id, JobImage.blob_id).where(JobImage.job_id == job_id)).all()
    if old:
        session.execute(delete(JobImage).where(JobImage.id.in_([row.id for row in old])))
        delete_blobs(session, [row.blob_id for row in old])
    for kind, index, data in pngs:
        if kind not in IMAGE_KINDS:
            raise ValueError(f"image kind must be one of {IMAGE_KINDS}, not {kind!r}")
        blob = put_blob(session, data, "image/png", f"images/{job_id}/{kind}-{index}-{new_id()}.png")
        session.add(JobImage(job_id=job_id, kind=kind, index=index, blob_id=blob.id))
    session.commit()


def get_image(session: Session, job_id: str, kind: str, index: int) -> Blob:
    """A stored image or heatmap's blob (blob_bytes reads it, download_url links to it); NotFound (kind 'image' or
    'heatmap') when the job has none at that index, or no longer has it (image retention)."""
    blob_id = session.scalar(
        select(JobImage.blob_id).where(JobImage.job_id == job_id, JobImage.kind == kind, JobImage.index == index)
    )
    if blob_id is None:
        raise NotFound(kind, f"{job_id}/{index}")
    return get_blob(session, blob_id)


def save_checkpoint(session: Session, job_id: str, step: int, data: bytes) -> None:
    """Keep one checkpoint per job, rewritten in place: the same row, blob and object each time (never a history of
    them); commits."""
    row = session.get(Checkpoint, job_id)
    if row is None:
        blob = put_blob(session, data, CHECKPOINT_CONTENT_TYPE, f"checkpoints/{job_id}.tar", shared_name=True)
        session.add(Checkpoint(job_id=job_id, step=step, blob_id=blob.id, updated_at=utcnow()))
    else:
        rewrite_blob(session, row.blob_id, data)
        row.step, row.updated_at = step, utcnow()
    session.commit()


def load_checkpoint(session: Session, job_id: str) -> tuple[int, bytes] | None:
    """(step, bytes) of the job's checkpoint, or None when it has none (or its object is gone from the bucket: the
    job starts again rather than fail)."""
    row = session.get(Checkpoint, job_id)
    if row is None:
        return None
    try:
        return row.step, blob_bytes(session, get_blob(session, row.blob_id))
    except NotFound as exc:
        log.warning("job %s: its checkpoint cannot be read (%s); it starts from step 0", job_id, exc)
        return None


def quota_stopped_predecessor(session: Session, job: Job) -> str | None:
    """The id of the tenant's latest finetune of this same request that its compute quota stopped and that left a
    checkpoint: the job `job` may start from that checkpoint instead of step 0. None when there is none."""
    return session.scalar(
        select(Job.id)
        .join(Checkpoint, Checkpoint.job_id == Job.id)
        .where(
            Job.tenant == job.tenant,
            Job.kind == "finetune",
            Job.request_hash == job.request_hash,
            Job.error_code == COMPUTE_QUOTA_EXCEEDED,
            Job.id != job.id,
        )
        .order_by(Job.finished_at.desc())
        .limit(1)
    )


def delete_checkpoint(session: Session, job_id: str) -> None:
    """A finished job needs no checkpoint; commits."""
    blob_id = session.scalar(select(Checkpoint.blob_id).where(Checkpoint.job_id == job_id))
    if blob_id is not None:
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))
        delete_blob(session, blob_id)
    session.commit()
