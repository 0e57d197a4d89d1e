"""What a job leaves besides its row: a generate job's images and heatmaps, a running finetune's latest checkpoint."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from sepen_store.blobs import delete_blob, get_blob, put_blob
from sepen_store.errors import NotFound
from sepen_store.tables import Blob, Checkpoint, JobImage, utcnow

IMAGE_KINDS = ("image", "heatmap")
CHECKPOINT_CONTENT_TYPE = "application/x-tar"


def replace_images(session: Session, job_id: str, pngs: list[tuple[str, int, bytes]]) -> None:
    """Store a job's (kind, index, PNG bytes), replacing whatever an earlier attempt of the job stored; commits."""
    for old in session.scalars(select(JobImage).where(JobImage.job_id == job_id)):
        session.delete(old)
        session.flush()
        delete_blob(session, old.blob_id)
    for kind, index, data in pngs:
        if kind not in IMAGE_KINDS:
            raise ValueError(f"image kind must be one of {IMAGE_KINDS}, not {kind!r}")
        session.add(JobImage(job_id=job_id, kind=kind, index=index, blob_id=put_blob(session, data, "image/png").id))
    session.commit()


def get_image(session: Session, job_id: str, kind: str, index: int) -> Blob:
    """A stored image or heatmap; NotFound (kind 'image' or 'heatmap') when the job has none at that index."""
    blob_id = session.scalar(
        select(JobImage.blob_id).where(JobImage.job_id == job_id, JobImage.kind == kind, JobImage.index == index)
    )
    if blob_id is None:
        raise NotFound(kind, f"{job_id}/{index}")
    return get_blob(session, blob_id)


def save_checkpoint(session: Session, job_id: str, step: int, data: bytes) -> None:
    """Keep one checkpoint per job: the newest replaces the last (and its blob); commits."""
    blob = put_blob(session, data, CHECKPOINT_CONTENT_TYPE)
    row = session.get(Checkpoint, job_id)
    if row is None:
        session.add(Checkpoint(job_id=job_id, step=step, blob_id=blob.id, updated_at=utcnow()))
    else:
        old_blob, row.step, row.blob_id, row.updated_at = row.blob_id, step, blob.id, utcnow()
        session.flush()
        delete_blob(session, old_blob)
    session.commit()


def load_checkpoint(session: Session, job_id: str) -> tuple[int, bytes] | None:
    """(step, bytes) of the job's checkpoint, or None when it has none."""
    row = session.get(Checkpoint, job_id)
    return None if row is None else (row.step, get_blob(session, row.blob_id).data)


def delete_checkpoint(session: Session, job_id: str) -> None:
    """A finished job needs no checkpoint; commits."""
    row = session.get(Checkpoint, job_id)
    if row is not None:
        blob_id = row.blob_id
        session.delete(row)
        session.flush()
        delete_blob(session, blob_id)
    session.commit()
