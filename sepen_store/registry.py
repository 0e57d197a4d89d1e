"""The adapter registry: immutable versions `name@N` per tenant, exactly one per finetune job.

Version numbers come from a per-adapter counter that is never rewound, so `name@N` always means
the same weights, even after a version is deleted.
"""

from __future__ import annotations

import re

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sepen_store.blobs import blob_bytes, delete_blob, get_blob, put_blob
from sepen_store.errors import Conflict, NotFound
from sepen_store.tables import Adapter, AdapterVersion, Blob, Job, new_id

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # whole names only: fullmatch (`$` would allow a newline)
# ASCII digits only: str.isdigit() also takes '١' and '²'. The column is a 32-bit integer.
VERSION_PATTERN = re.compile(r"[0-9]{1,10}")
MAX_VERSION = 2**31 - 1
ADAPTER_CONTENT_TYPE = "application/vnd.sepen.adapter+safetensors"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'name' (latest) or 'name@N' -> (name, N or None); ValueError says what is wrong."""
    name, sep, version = ref.partition("@")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            "adapter name must be 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    if not sep:
        return name, None
    if not VERSION_PATTERN.fullmatch(version) or not 1 <= int(version) <= MAX_VERSION:
        raise ValueError(f"adapter version must be a whole number from 1 to {MAX_VERSION}, as in name@3")
    return name, int(version)


def publish_version(
    session: Session,
    *,
    tenant: str,
    name: str,
    job_id: str,
    data: bytes,
    base_model: str,
    base_fingerprint: str,
    sha256: str,
    metadata: dict,
) -> AdapterVersion:
    """Store a finetune job's adapter as the next version of `name`; a second call for the same job
    returns the version the first one made."""
    existing = version_of_job(session, job_id)
    if existing is not None:
        return existing
    for _ in range(5):
        try:
            adapter = session.scalar(select(Adapter).where(Adapter.tenant == tenant, Adapter.name == name))
            if adapter is None:
                adapter = Adapter(tenant=tenant, name=name, next_version=1)
                session.add(adapter)
                session.flush()
            # Take the number with a conditional bump: two publishers never get the same N.
            taken = adapter.next_version
            bumped = session.execute(
                update(Adapter)
                .execution_options(synchronize_session=False)
                .where(Adapter.id == adapter.id, Adapter.next_version == taken)
                .values(next_version=taken + 1)
            )
            if bumped.rowcount != 1:
                session.rollback()
                continue
            blob = put_blob(session, data, ADAPTER_CONTENT_TYPE, f"adapters/{new_id()}.safetensors")
            version = AdapterVersion(
                adapter_id=adapter.id,
                version=taken,
                job_id=job_id,
                base_model=base_model,
                base_fingerprint=base_fingerprint,
                sha256=sha256,
                size=len(data),
                meta=metadata,
                blob_id=blob.id,
            )
            session.add(version)
            session.commit()
            return version
        except IntegrityError:
            session.rollback()
            existing = version_of_job(session, job_id)
            if existing is not None:
                return existing
    raise Conflict(f"could not allocate a version of adapter {name!r}; retry")


def version_of_job(session: Session, job_id: str) -> AdapterVersion | None:
    """The version a finetune job published, if it did (an attempt may publish and die before finishing the job)."""
    return session.scalar(select(AdapterVersion).where(AdapterVersion.job_id == job_id))


def version_ref(version: AdapterVersion) -> str:
    """'name@N' of a stored version."""
    return f"{version.adapter.name}@{version.version}"


def resolve(session: Session, tenant: str, ref: str) -> AdapterVersion:
    """'name' -> its latest version; 'name@N' -> that version. NotFound names what is missing."""
    name, number = parse_ref(ref)
    adapter = session.scalar(select(Adapter).where(Adapter.tenant == tenant, Adapter.name == name))
    if adapter is None:
        raise NotFound("adapter", name)
    query = select(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id)
    if number is None:
        version = session.scalar(query.order_by(AdapterVersion.version.desc()).limit(1))
    else:
        version = session.scalar(query.where(AdapterVersion.version == number))
    if version is None:
        raise NotFound("adapter version", ref if number is not None else f"{name} (it has no versions)")
    return version


def list_adapters(session: Session, tenant: str) -> list[tuple[Adapter, int, AdapterVersion | None]]:
    """(adapter, number of versions, its latest version or None) per adapter of the tenant, by name."""
    rows = session.execute(
        select(Adapter, func.count(AdapterVersion.id), func.max(AdapterVersion.version))
        .outerjoin(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
        .where(Adapter.tenant == tenant)
        .group_by(Adapter.id)
        .order_by(Adapter.name)
    ).all()
    newest = [(a.id, latest) for a, _, latest in rows if latest is not None]
    versions = (
        session.scalars(
            select(AdapterVersion).where(tuple_(AdapterVersion.adapter_id, AdapterVersion.version).in_(newest))
        )
        if newest
        else []
    )
    latest_of = {v.adapter_id: v for v in versions}
    return [(a, n, latest_of.get(a.id)) for a, n, _ in rows]


def get_adapter(session: Session, tenant: str, name: str) -> Adapter:
    if not NAME_PATTERN.fullmatch(name):  # it cannot exist (and a NUL would break the query)
        raise NotFound("adapter", name)
    adapter = session.scalar(select(Adapter).where(Adapter.tenant == tenant, Adapter.name == name))
    if adapter is None:
        raise NotFound("adapter", name)
    return adapter


def get_version(session: Session, version_id: str) -> AdapterVersion:
    """A version by its id (a generate job pins one); NotFound when it was deleted."""
    version = session.get(AdapterVersion, version_id)
    if version is None:
        raise NotFound("adapter version", version_id)
    return version


def version_bytes(session: Session, version: AdapterVersion) -> bytes:
    return blob_bytes(session, get_blob(session, version.blob_id))


def version_blob(session: Session, version: AdapterVersion) -> Blob:
    """The blob of a version's safetensors file (sepen_store.blobs.download_url links to it)."""
    return get_blob(session, version.blob_id)


def latest_evaluations(session: Session, version_ids: list[str]) -> dict[str, Job]:
    """Each version's most recent succeeded evaluate job (its result is the version's evaluation), by version id."""
    if not version_ids:
        return {}
    jobs = session.scalars(
        select(Job)
        .where(Job.kind == "evaluate", Job.status == "succeeded", Job.adapter_version_id.in_(version_ids))
        .order_by(Job.finished_at.desc())
    )
    latest: dict[str, Job] = {}
    for job in jobs:
        latest.setdefault(job.adapter_version_id, job)
    return latest


def delete_version(session: Session, tenant: str, name: str, number: int) -> None:
    """Delete `name@N` unless a queued or running job will use it (Conflict names the job)."""
    version = resolve(session, tenant, f"{name}@{number}")
    user = session.scalar(
        select(Job.id)
        .where(Job.adapter_version_id == version.id, Job.status.in_(("queued", "running", "canceling")))
        .limit(1)
    )
    if user is not None:
        raise Conflict(f"adapter {name}@{number} is used by job {user}, which has not finished; cancel it or wait")
    session.execute(
        update(Job)
        .execution_options(synchronize_session=False)
        .where(Job.adapter_version_id == version.id)
        .values(adapter_version_id=None)
    )
    blob_id = version.blob_id
    session.delete(version)
    session.flush()
    delete_blob(session, blob_id)
    session.commit()
