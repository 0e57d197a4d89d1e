"""Blobs: adapter weights, images and checkpoints, readable from any machine without a shared filesystem.

A blob's bytes live in its row (SEPEN_BLOB_BACKEND=database, the default and the embedded mode's) or in an
S3-compatible bucket (s3), the row then keeping the object's key, size, sha256 and content type. Each row says where
its own bytes are, so the rows written before a switch of backend stay readable (with the bucket configured).

The bucket comes with the session, as the job events' publisher does: `session_factory(engine,
blobs=object_store_for(settings))` puts it in every session's `info`; a session without one keeps bytes in rows.
Rows and objects stay consistent across transactions: an object is written before its row is flushed and deleted only
after the commit that deleted its row, so a crash between the two leaves an object no row names, never a row without
its bytes; the objects a transaction wrote are deleted when it rolls back.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session

from sepen_store.errors import NotFound, StorageRefused, StorageUnavailable
from sepen_store.tables import Blob, new_id

if TYPE_CHECKING:
    from sepen_store.object_store import ObjectStore

log = logging.getLogger(__name__)

STORE_INFO_KEY = "sepen_object_store"
_WRITTEN = "sepen_objects_written"  # keys of the objects this transaction created: deleted if it rolls back
_DOOMED = "sepen_objects_doomed"  # keys of the objects whose rows this transaction deleted: deleted once it commits


def object_store(session: Session) -> ObjectStore | None:
    """The bucket of the session's factory, or None when blobs live in the database."""
    return session.info.get(STORE_INFO_KEY)


def put_blob(
    session: Session, data: bytes, content_type: str, name: str | None = None, *, shared_name: bool = False
) -> Blob:
    """Add a blob to the session (committed with the row that refers to it). `name` is its object's name in the
    bucket, such as images/<job id>/image-0-<id>.png (default blobs/<blob id>); no two rows share one. shared_name:
    every writer of this blob uses the same name (a job's one checkpoint), so a writer whose transaction rolls back
    leaves the object to the one whose row won."""
    blob = Blob(id=new_id(), sha256=hashlib.sha256(data).hexdigest(), size=len(data), content_type=content_type)
    store = object_store(session)
    if store is None:
        blob.data = data
    else:
        blob.object_key = store.key(name or f"blobs/{blob.id}")
        if not shared_name:
            _follow_transaction(session)
            session.info.setdefault(_WRITTEN, []).append(blob.object_key)
        store.put(blob.object_key, data, content_type)
    session.add(blob)
    session.flush()
    return blob


def rewrite_blob(session: Session, blob_id: str, data: bytes) -> Blob:
    """Replace a blob's bytes in place, under the same row and the same object key (a finetune's one checkpoint).
    The object is replaced whole before the row's sha256 and size are: both readers and a crash see an old or a new
    object, never half of one."""
    blob = get_blob(session, blob_id)
    store = object_store(session)
    blob.sha256, blob.size = hashlib.sha256(data).hexdigest(), len(data)
    if store is None:
        blob.data, blob.object_key = data, None  # an object it had is left behind: without a bucket, no way to it
    else:
        if blob.object_key is None:  # written before the switch to s3: its bytes move to the bucket now
            blob.object_key, blob.data = store.key(f"blobs/{blob.id}"), None
        store.put(blob.object_key, data, blob.content_type)
    session.flush()
    return blob


def get_blob(session: Session, blob_id: str) -> Blob:
    """A blob's row (its metadata: sha256, size, content type, where its bytes are); blob_bytes reads the bytes."""
    blob = session.get(Blob, blob_id)
    if blob is None:
        raise NotFound("blob", blob_id)
    return blob


def blob_bytes(session: Session, blob: Blob) -> bytes:
    """The blob's bytes, from its row or from the bucket."""
    if blob.object_key is None:
        return blob.data
    store = object_store(session)
    if store is None:
        raise StorageUnavailable(
            f"blob {blob.id} keeps its bytes in an object store (key {blob.object_key!r}) but this process has none: "
            "set SEPEN_BLOB_BACKEND=s3 and the SEPEN_S3_* settings of that bucket"
        )
    return store.get(blob.object_key)


def download_url(
    session: Session, blob: Blob, *, filename: str | None = None, content_type: str | None = None
) -> str | None:
    """A presigned URL that fetches the blob's bytes straight from the bucket, without credentials, for
    SEPEN_S3_PRESIGN_TTL_S seconds, answered as `content_type` (default: the blob's) and as an attachment named
    `filename` if given; None for a blob in the database."""
    store = object_store(session)
    if blob.object_key is None or store is None:
        return None
    return store.presigned_url(blob.object_key, content_type=content_type or blob.content_type, filename=filename)


def delete_blobs(session: Session, blob_ids: list[str]) -> None:
    """Delete these blobs' rows now and their objects once the session commits."""
    if not blob_ids:
        return
    store = object_store(session)
    if store is not None:
        keys = session.scalars(select(Blob.object_key).where(Blob.id.in_(blob_ids), Blob.object_key.is_not(None))).all()
        if keys:
            _follow_transaction(session)
            session.info.setdefault(_DOOMED, []).extend(keys)
    session.execute(delete(Blob).where(Blob.id.in_(blob_ids)))


def delete_blob(session: Session, blob_id: str) -> None:
    delete_blobs(session, [blob_id])


def _follow_transaction(session: Session) -> None:
    """Have the session delete the objects its transaction doomed after it commits, and those it wrote after it
    rolls back (once per session)."""
    if not event.contains(session, "after_commit", _after_commit):
        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_rollback", _after_rollback)


def _after_commit(session: Session) -> None:
    session.info.pop(_WRITTEN, None)
    _delete_objects(session, session.info.pop(_DOOMED, None))


def _after_rollback(session: Session) -> None:
    session.info.pop(_DOOMED, None)
    _delete_objects(session, session.info.pop(_WRITTEN, None))


def _delete_objects(session: Session, keys: list[str] | None) -> None:
    store = object_store(session)
    if not keys or store is None:
        return
    try:
        store.delete(keys)
    except (StorageUnavailable, StorageRefused) as exc:  # the rows are settled: an object left costs space, not truth
        log.warning("%d object(s) no row refers to are left in the bucket: %s", len(keys), exc)
