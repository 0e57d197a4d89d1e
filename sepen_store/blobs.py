"""Blob storage in the database: adapter weights, images and checkpoints, readable from any machine."""

from __future__ import annotations

import hashlib

from sqlalchemy import delete
from sqlalchemy.orm import Session

from sepen_store.errors import NotFound
from sepen_store.tables import Blob


def put_blob(session: Session, data: bytes, content_type: str) -> Blob:
    """Add a blob to the session (committed with the row that refers to it)."""
    blob = Blob(sha256=hashlib.sha256(data).hexdigest(), size=len(data), content_type=content_type, data=data)
    session.add(blob)
    session.flush()
    return blob


def get_blob(session: Session, blob_id: str) -> Blob:
    blob = session.get(Blob, blob_id)
    if blob is None:
        raise NotFound("blob", blob_id)
    return blob


def delete_blob(session: Session, blob_id: str) -> None:
    session.execute(delete(Blob).where(Blob.id == blob_id))
