"""Blobs in a real S3-compatible server (SeaweedFS on loopback, tests/seaweedfs.py), with the rows on SQLite and on
Postgres: each kind's round trip, presigned URLs, one checkpoint object per job, objects deleted only after the commit
that deleted their rows (and written ones removed on rollback), and retention."""

import hashlib
import time
import uuid
from contextlib import ExitStack
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select, update

from sepen_store.availability import outage_of
from sepen_store.blobs import blob_bytes, download_url, get_blob, put_blob
from sepen_store.database import session_factory
from sepen_store.errors import NotFound, StorageRefused, StorageUnavailable
from sepen_store.job_outputs import (
    delete_checkpoint,
    get_image,
    load_checkpoint,
    replace_images,
    save_checkpoint,
)
from sepen_store.jobs import Claim, claim_job, create_job, finish_job
from sepen_store.object_store import HEALTH_TTL_S, ObjectStore
from sepen_store.registry import delete_version, publish_version, version_blob, version_bytes
from sepen_store.retention import apply_retention
from sepen_store.settings import Settings
from sepen_store.tables import Blob, Checkpoint, Job, utcnow
from worker.outages import through_outages

ADAPTER = b"safetensors bytes " * 1000


@pytest.fixture
def store(s3_server, s3_bucket):
    store = ObjectStore(Settings(**s3_server.settings(s3_bucket)))
    yield store
    store.close()


@pytest.fixture
def s3_sessions(sessions, store):
    """The module's database (SQLite or Postgres), its blobs' bytes in the test's bucket."""
    return session_factory(sessions.kw["bind"], blobs=store)


def finished_job(session, kind="generate", status="succeeded"):
    job, _ = create_job(session, "acme", kind, {"n": uuid.uuid4().hex})
    claim = claim_job(session, job.id, "w1", lease_s=60)
    assert finish_job(session, claim, status, result={})
    return job


def running_job(session, kind="finetune"):
    job, _ = create_job(session, "acme", kind, {"n": uuid.uuid4().hex})
    assert claim_job(session, job.id, "w1", lease_s=60) is not None
    return job


def publish(session, name="cat-dog", data=ADAPTER):
    job = finished_job(session, kind="finetune")
    return publish_version(
        session,
        tenant="acme",
        name=name,
        job_id=job.id,
        data=data,
        base_model="sepen-tiny",
        base_fingerprint="f" * 64,
        sha256=hashlib.sha256(data).hexdigest(),
        metadata={},
    )


def test_each_kind_of_blob_goes_through_the_bucket_and_back(s3_sessions, s3_server, s3_bucket):
    pngs = [("image", 0, b"\x89PNG zero"), ("image", 1, b"\x89PNG one"), ("heatmap", 0, b"\x89PNG heat")]
    checkpoint = bytes(range(256)) * 4096  # 1 MiB
    with s3_sessions() as session:
        version = publish(session)
        job = finished_job(session)
        replace_images(session, job.id, pngs)
        finetune = running_job(session)
        save_checkpoint(session, finetune.id, 50, checkpoint)

    with s3_sessions() as session:  # a fresh session reads what the others wrote
        assert version_bytes(session, version) == ADAPTER
        for kind, index, data in pngs:
            blob = get_image(session, job.id, kind, index)
            assert blob_bytes(session, blob) == data and blob.sha256 == hashlib.sha256(data).hexdigest()
            assert blob.size == len(data) and blob.content_type == "image/png"
        assert load_checkpoint(session, finetune.id) == (50, checkpoint)
        blobs = [version_blob(session, version), get_image(session, job.id, "image", 0)]
        rows = session.execute(select(Blob.data, Blob.object_key).where(Blob.id.in_([b.id for b in blobs]))).all()
        assert all(data is None and key for data, key in rows)  # the rows keep keys; the bytes are in the bucket

    keys = s3_server.keys(s3_bucket)
    assert len(keys) == 5 and f"checkpoints/{finetune.id}.tar" in keys
    assert sum(key.startswith(f"images/{job.id}/") for key in keys) == 3
    assert sum(key.startswith("adapters/") and key.endswith(".safetensors") for key in keys) == 1
    client = s3_server.client()
    assert client.get_object(Bucket=s3_bucket, Key=f"checkpoints/{finetune.id}.tar")["Body"].read() == checkpoint


def test_a_presigned_url_fetches_the_bytes_without_credentials(s3_sessions, s3_server, s3_bucket):
    with s3_sessions() as session:
        version = publish(session)
        job = finished_job(session)
        replace_images(session, job.id, [("image", 0, b"\x89PNG presigned")])
        image_url = download_url(session, get_image(session, job.id, "image", 0))
        weights_url = download_url(
            session, version_blob(session, version), filename="cat-dog@1.safetensors", content_type="x/y"
        )
    assert image_url.startswith(s3_server.endpoint_url) and "X-Amz-Signature=" in image_url
    image = httpx.get(image_url)
    assert image.status_code == 200 and image.content == b"\x89PNG presigned"
    assert image.headers["content-type"] == "image/png"
    weights = httpx.get(weights_url)
    assert weights.status_code == 200 and weights.content == ADAPTER and weights.headers["content-type"] == "x/y"
    assert weights.headers["content-disposition"] == 'attachment; filename="cat-dog@1.safetensors"'
    tampered = image_url.replace(f"images%2F{job.id}", "images%2Fother").replace(f"images/{job.id}", "images/other")
    assert httpx.get(tampered).status_code == 403  # the signature covers the key
    assert httpx.get(f"{s3_server.endpoint_url}/{s3_bucket}/adapters/").status_code == 403  # no anonymous reads


def test_a_presigned_url_expires(s3_server, s3_bucket, sessions):
    # S3 signs the request time to the second, so a URL lives between ttl - 1 and ttl seconds: 3 s leaves room for
    # a loaded machine between signing and the first fetch.
    store = ObjectStore(Settings(**s3_server.settings(s3_bucket, s3_presign_ttl_s=3)))
    with session_factory(sessions.kw["bind"], blobs=store)() as session:
        blob = put_blob(session, b"short-lived", "text/plain", "misc/short")
        session.commit()
        url = download_url(session, blob)
    assert httpx.get(url).content == b"short-lived"
    time.sleep(3.5)
    assert httpx.get(url).status_code == 403
    store.close()


def test_a_job_keeps_one_checkpoint_object_rewritten_in_place(s3_sessions, s3_server, s3_bucket):
    with s3_sessions() as session:
        job = running_job(session)
        for step in (10, 20, 30):
            save_checkpoint(session, job.id, step, f"state after {step} steps".encode() * 1000)
            assert s3_server.keys(s3_bucket) == [f"checkpoints/{job.id}.tar"]  # never a second object
        row = session.get(Checkpoint, job.id)
        assert session.scalar(select(func.count()).select_from(Blob).where(Blob.id == row.blob_id)) == 1
        assert load_checkpoint(session, job.id) == (30, b"state after 30 steps" * 1000)
        assert get_blob(session, row.blob_id).sha256 == hashlib.sha256(b"state after 30 steps" * 1000).hexdigest()
        delete_checkpoint(session, job.id)  # the job finished
        assert load_checkpoint(session, job.id) is None
        assert s3_server.keys(s3_bucket) == []

        save_checkpoint(session, job.id, 40, b"lost")  # an object lost from the bucket: the job starts again
        s3_server.client().delete_object(Bucket=s3_bucket, Key=f"checkpoints/{job.id}.tar")
        assert load_checkpoint(session, job.id) is None


def test_objects_follow_their_transaction(s3_sessions, s3_server, s3_bucket):
    with s3_sessions() as session:
        version = publish(session)
        key = version_blob(session, version).object_key
        put_blob(session, b"never committed", "text/plain", "misc/rolled-back")
        assert "misc/rolled-back" in s3_server.keys(s3_bucket)  # written before its row
        session.rollback()
        assert s3_server.keys(s3_bucket) == [key]  # gone with the transaction that wrote it

        job = finished_job(session)
        replace_images(session, job.id, [("image", 0, b"first attempt")])
        first = s3_server.keys(s3_bucket, f"images/{job.id}/")
        replace_images(session, job.id, [("image", 0, b"second attempt")])  # a retried job replaces its images
        second = s3_server.keys(s3_bucket, f"images/{job.id}/")
        assert len(first) == len(second) == 1 and first != second
        assert blob_bytes(session, get_image(session, job.id, "image", 0)) == b"second attempt"

        delete_version(session, "acme", "cat-dog", version.version)  # commits: then the object goes
        assert key not in s3_server.keys(s3_bucket)


def test_retention_deletes_old_images_and_checkpoints_but_never_adapters(s3_sessions, s3_server, s3_bucket):
    long_ago = utcnow() - timedelta(days=40)
    with s3_sessions() as session:
        version = publish(session)
        old, recent = finished_job(session), finished_job(session)
        replace_images(session, old.id, [("image", 0, b"old image"), ("heatmap", 0, b"old heatmap")])
        replace_images(session, recent.id, [("image", 0, b"recent image")])
        stale, live, orphan = running_job(session), running_job(session), running_job(session)
        for job in (stale, live, orphan):
            save_checkpoint(session, job.id, 10, f"checkpoint of {job.id}".encode())
        finish_job(session, _claim(session, orphan), "failed")  # and its worker died before deleting its checkpoint
        # The adapter's job and the old generate job finished 40 days ago; the stale checkpoint was written 10 days ago.
        session.execute(update(Job).where(Job.id.in_([old.id, version.job_id])).values(finished_at=long_ago))
        session.execute(
            update(Checkpoint).where(Checkpoint.job_id == stale.id).values(updated_at=utcnow() - timedelta(days=10))
        )
        session.commit()

        kept = apply_retention(session, image_days=0, checkpoint_days=0)  # 0: keep for ever
        assert (kept.images, kept.checkpoints) == (0, 0) and len(s3_server.keys(s3_bucket)) == 7

        removed = apply_retention(session, image_days=30, checkpoint_days=7)
        assert (removed.images, removed.checkpoints) == (2, 2)

    with s3_sessions() as session:
        with pytest.raises(NotFound, match="image"):
            get_image(session, old.id, "image", 0)
        assert blob_bytes(session, get_image(session, recent.id, "image", 0)) == b"recent image"
        assert load_checkpoint(session, stale.id) is None and load_checkpoint(session, orphan.id) is None
        assert load_checkpoint(session, live.id) == (10, f"checkpoint of {live.id}".encode())
        assert version_bytes(session, version) == ADAPTER  # adapters are never retention's
        adapter_key = version_blob(session, version).object_key
    assert set(s3_server.keys(s3_bucket)) == {
        adapter_key,
        f"checkpoints/{live.id}.tar",
        *s3_server.keys(s3_bucket, f"images/{recent.id}/"),
    }
    assert len(s3_server.keys(s3_bucket)) == 3


def _claim(session, job):
    """The claim running_job made (the job's first attempt), as its worker holds it."""
    return Claim(job.id, attempt=1, resumed=False)


def test_a_store_that_is_down_is_unavailable_and_one_that_refuses_is_refused(sessions, s3_server, s3_bucket):
    """No answer is an outage (StorageUnavailable, waited out); a 4xx answer (here a wrong secret: 403) is a refusal
    (StorageRefused), which no outage handling waits for, naming what was refused where and the settings to check."""
    nobody = ObjectStore(Settings(**s3_server.settings(s3_bucket, s3_endpoint_url="http://127.0.0.1:9")))
    with session_factory(sessions.kw["bind"], blobs=nobody)() as session:
        with pytest.raises(StorageUnavailable, match=f"could not store 'misc/x' in bucket '{s3_bucket}'"):
            put_blob(session, b"x", "text/plain", "misc/x")
    nobody.close()
    store = ObjectStore(Settings(**s3_server.settings(s3_bucket, s3_secret_access_key="not-the-secret")))
    with session_factory(sessions.kw["bind"], blobs=store)() as session:
        with pytest.raises(StorageRefused, match=f"{store.where} refused to store 'misc/x'") as refused:
            put_blob(session, b"x", "text/plain", "misc/x")
    assert "SignatureDoesNotMatch" in str(refused.value) and "SEPEN_S3_" in str(refused.value)
    assert outage_of(refused.value) is None
    with pytest.raises(StorageRefused, match="refused to read 'misc/x'"):
        store.get("misc/x")
    store.close()


def test_a_process_without_the_bucket_cannot_read_its_blobs(sessions, s3_server, s3_bucket):
    """It is told which settings it lacks; an object gone from the bucket is NotFound."""
    with session_factory(sessions.kw["bind"])() as session:
        store = ObjectStore(Settings(**s3_server.settings(s3_bucket)))
        with session_factory(sessions.kw["bind"], blobs=store)() as writer:
            blob = put_blob(writer, b"in the bucket", "text/plain", "misc/y")
            writer.commit()
        with pytest.raises(StorageUnavailable, match="SEPEN_BLOB_BACKEND=s3"):
            blob_bytes(session, get_blob(session, blob.id))
        s3_server.client().delete_object(Bucket=s3_bucket, Key="misc/y")
        with pytest.raises(NotFound, match="stored object 'misc/y'"):
            blob_bytes(writer, blob)
        store.close()


def test_blobs_in_the_database_stay_readable_after_the_switch_to_s3(sessions, s3_sessions, s3_server, s3_bucket):
    with sessions() as session:  # the database backend: no bucket
        job = running_job(session)
        save_checkpoint(session, job.id, 5, b"checkpoint in a row")
        done = finished_job(session)
        replace_images(session, done.id, [("image", 0, b"image in a row")])
    assert s3_server.keys(s3_bucket) == []
    with s3_sessions() as session:
        blob = get_image(session, done.id, "image", 0)
        assert blob_bytes(session, blob) == b"image in a row" and download_url(session, blob) is None
        assert load_checkpoint(session, job.id) == (5, b"checkpoint in a row")
        save_checkpoint(session, job.id, 10, b"checkpoint in the bucket")  # the next write moves it
        assert load_checkpoint(session, job.id) == (10, b"checkpoint in the bucket")
        row = session.get(Checkpoint, job.id)
        assert s3_server.keys(s3_bucket) == [f"blobs/{row.blob_id}"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_0005_keeps_the_blobs_stored_before_it(backend, tmp_path):
    """An embedded database or a Postgres with adapters, images and checkpoints in rows upgrades in place: the rows
    stay readable, and sizes past 2 GiB fit. Downgrading refuses while blobs live in a bucket."""
    from alembic import command
    from sqlalchemy import text

    from sepen_store.database import alembic_config, make_engine, upgrade_database
    from tests.conftest import postgres_database

    with ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'old.db'}"
        else:
            url = stack.enter_context(postgres_database("sepen_migration_0005", migrate=False))
        upgrade_database(url, "0004")
        engine = make_engine(url)
        with engine.begin() as connection:  # what 0004's tables held: a blob in a row, and a version referring to it
            connection.execute(
                text(
                    "INSERT INTO blobs (id, sha256, size, content_type, data, created_at) "
                    "VALUES ('b1', :sha, 3, 'application/octet-stream', :data, CURRENT_TIMESTAMP)"
                ),
                {"sha": hashlib.sha256(b"old").hexdigest(), "data": b"old"},
            )
            connection.execute(
                text(
                    "INSERT INTO adapters (id, tenant, name, next_version, created_at) "
                    "VALUES ('a1', 'acme', 'old', 2, CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO adapter_versions (id, adapter_id, version, job_id, base_model, base_fingerprint, "
                    "sha256, size, metadata, blob_id, created_at) VALUES ('v1', 'a1', 1, 'j1', 'm', 'f', 's', 3, "
                    "'{}', 'b1', CURRENT_TIMESTAMP)"
                )
            )
        upgrade_database(url)
        with session_factory(engine)() as session:
            assert blob_bytes(session, get_blob(session, "b1")) == b"old"
            session.add(Blob(id="b2", sha256="0" * 64, size=3 * 2**30, content_type="x", object_key="huge"))
            session.commit()
            assert get_blob(session, "b2").size == 3 * 2**30
        with pytest.raises(RuntimeError, match="1 blob"):
            command.downgrade(alembic_config(url), "0004")
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM blobs WHERE id = 'b2'"))
        command.downgrade(alembic_config(url), "0004")
        with engine.connect() as connection:
            assert connection.execute(text("SELECT data FROM blobs WHERE id = 'b1'")).scalar() == b"old"
        engine.dispose()


def test_a_refusal_is_no_outage_to_wait_out(s3_server, s3_bucket):
    """A job's step that meets a refusal fails at once instead of waiting SEPEN_OUTAGE_GRACE_S for an answer that
    will not change; the readiness probe and a download's link raise it too, and none of it reads as a store that
    is down."""
    store = ObjectStore(Settings(**s3_server.settings(s3_bucket, s3_secret_access_key="not-the-secret")))
    started = time.monotonic()
    with pytest.raises(StorageRefused):
        through_outages(lambda: store.put("misc/z", b"z", "text/plain"), grace_s=60, sleep=time.sleep)
    assert time.monotonic() - started < 10
    for _ in range(2):  # probed, then what the probe found, remembered for HEALTH_TTL_S
        with pytest.raises(StorageRefused, match="refuses access to the bucket"):
            store.reachable()
    with pytest.raises(StorageRefused):
        store.presigned_url("misc/z", content_type="text/plain")
    store.close()
    missing = ObjectStore(Settings(**s3_server.settings(f"{s3_bucket}-not-there")))  # HEAD: 404
    with pytest.raises(StorageRefused, match="SEPEN_S3_"):
        missing.reachable()
    missing.close()


def test_no_presigned_url_to_a_store_that_does_not_answer(s3_server, s3_bucket):
    """A redirect would send the client to the outage: the store refuses to sign while it is known down, and a store
    that answers again is believed once what it last said is older than HEALTH_TTL_S."""
    nobody = ObjectStore(Settings(**s3_server.settings(s3_bucket, s3_endpoint_url="http://127.0.0.1:9")))
    assert not nobody.reachable()
    with pytest.raises(StorageUnavailable, match="not answering"):
        nobody.presigned_url("misc/x", content_type="text/plain")
    nobody.close()
    store = ObjectStore(Settings(**s3_server.settings(s3_bucket)))
    assert store.reachable() and store.presigned_url("misc/x", content_type="text/plain").startswith("http")
    store._health = (False, time.monotonic() - HEALTH_TTL_S)  # an outage seen long enough ago: asked again
    assert store.reachable()
    store.close()
