"""sepen_store on both backends (Postgres and the embedded SQLite file): migrations, the job state
machine and its conditional claims, the adapter registry's immutable versions, API keys."""

import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from sepen_store.auth import authenticate, create_api_key, revoke_api_key
from sepen_store.database import upgrade_database
from sepen_store.errors import Conflict, IllegalTransition, NotFound, Unauthorized
from sepen_store.jobs import (
    LostClaim,
    claim_job,
    create_job,
    finish_job,
    get_job,
    heartbeat,
    list_jobs,
    mark_enqueued,
    mark_not_enqueued,
    request_cancel,
    take_resends,
)
from sepen_store.registry import delete_version, list_adapters, parse_ref, publish_version, resolve, version_bytes
from sepen_store.tables import Job, utcnow


def new_job(session, tenant="acme", kind="finetune", key=None, request=None):
    job, _ = create_job(session, tenant, kind, request or {"n": uuid.uuid4().hex}, idempotency_key=key)
    return job


def test_claim_is_conditional_and_a_redelivery_is_a_no_op(sessions):
    with sessions() as s:
        job = new_job(s)
        first = claim_job(s, job.id, "w1", lease_s=60)
        assert first is not None and first.attempt == 1 and not first.resumed
        assert claim_job(s, job.id, "w2", lease_s=60) is None  # running with a fresh heartbeat
        assert finish_job(s, first, "succeeded", result={"ok": True})
        assert claim_job(s, job.id, "w2", lease_s=60) is None  # finished
        assert get_job(s, "acme", job.id).status == "succeeded"


def test_stale_heartbeat_lets_another_worker_take_over(sessions):
    with sessions() as s:
        job = new_job(s)
        old = claim_job(s, job.id, "w1", lease_s=60)
        long_ago = utcnow() - timedelta(seconds=120)  # sent and claimed long ago, silent since
        s.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=long_ago, enqueued_at=long_ago))
        s.commit()
        assert job.id in [j for j, _, _ in take_resends(s, requeue_after_s=300, lease_s=60)]
        new = claim_job(s, job.id, "w2", lease_s=60)
        assert new is not None and new.attempt == 2 and new.resumed
        with pytest.raises(LostClaim):
            heartbeat(s, old, {"step": 3})
        assert not finish_job(s, old, "succeeded")  # the old attempt can no longer write
        assert heartbeat(s, new, {"step": 1}) is False
        assert finish_job(s, new, "failed", error_code="x", error_message="y")
        job = get_job(s, "acme", job.id)
        assert (job.status, job.error_code, job.progress) == ("failed", "x", {"step": 1})


def test_cancel_queued_running_and_finished(sessions):
    with sessions() as s:
        queued = new_job(s)
        assert request_cancel(s, "acme", queued.id).status == "canceled"
        running = new_job(s)
        claim = claim_job(s, running.id, "w", lease_s=60)
        assert request_cancel(s, "acme", running.id).status == "canceling"
        assert heartbeat(s, claim) is True  # the worker sees the flag at its next step
        assert finish_job(s, claim, "canceled")
        assert request_cancel(s, "acme", running.id).status == "canceled"  # repeating a cancel is harmless
        finished = new_finished(s)
        with pytest.raises(IllegalTransition, match="is succeeded; it cannot become canceling"):
            request_cancel(s, "acme", finished.id)
        with pytest.raises(NotFound):
            request_cancel(s, "other-tenant", queued.id)


def new_finished(s):
    job = new_job(s)
    finish_job(s, claim_job(s, job.id, "w", lease_s=60), "succeeded")
    return job


def test_idempotency_key(sessions):
    with sessions() as s:
        key = uuid.uuid4().hex
        a, created_a = create_job(s, "acme", "generate", {"prompt": "x"}, idempotency_key=key)
        b, created_b = create_job(s, "acme", "generate", {"prompt": "x"}, idempotency_key=key)
        assert created_a and not created_b and a.id == b.id
        with pytest.raises(Conflict, match="different request"):
            create_job(s, "acme", "generate", {"prompt": "y"}, idempotency_key=key)
        c, created_c = create_job(s, "other", "generate", {"prompt": "x"}, idempotency_key=key)
        assert created_c and c.id != a.id


def test_queued_jobs_never_sent_or_long_waiting_are_re_enqueued(sessions):
    with sessions() as s:
        unsent = new_job(s, tenant="reenq")
        mark_not_enqueued(s, unsent.id)
        sent = new_job(s, tenant="reenq")
        mark_enqueued(s, sent.id)
        taken = take_resends(s, requeue_after_s=300, lease_s=60)
        assert (unsent.id, unsent.kind, "queued") in taken and sent.id not in [j for j, _, _ in taken]
        time.sleep(0.05)
        assert sent.id in [j for j, _, _ in take_resends(s, requeue_after_s=0.01, lease_s=60)]


def test_a_due_job_is_taken_by_one_reconciler_per_period(sessions):
    """Two workers' reconcilers see the same due job: one takes it; nobody again until the period has passed."""
    with sessions() as first, sessions() as second:
        job = new_job(first, tenant="reenq-once")
        mark_not_enqueued(first, job.id)
        rounds = [take_resends(s, requeue_after_s=0.5, lease_s=60) for s in (first, second, first)]
        assert [[j for j, _, _ in r].count(job.id) for r in rounds] == [1, 0, 0]
        time.sleep(0.6)
        assert job.id in [j for j, _, _ in take_resends(second, requeue_after_s=0.5, lease_s=60)]


def test_a_reclaimed_canceling_job_stays_canceling(sessions):
    with sessions() as s:
        job = new_job(s)
        claim_job(s, job.id, "w1", lease_s=60)
        request_cancel(s, "acme", job.id)
        s.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
        s.commit()
        again = claim_job(s, job.id, "w2", lease_s=60)
        assert again is not None and again.cancel_requested and again.attempt == 2
        assert get_job(s, "acme", job.id).status == "canceling"
        assert finish_job(s, again, "canceled")


def test_pagination_is_newest_first_without_gaps(sessions):
    with sessions() as s:
        made = [new_job(s, tenant="pages").id for _ in range(5)]
        seen, cursor = [], None
        for _ in range(3):
            page, cursor = list_jobs(s, "pages", cursor=cursor, limit=2)
            seen += [j.id for j in page]
        assert cursor is None and seen == made[::-1]
        finish_job(s, claim_job(s, made[0], "w", lease_s=60), "succeeded")
        assert [j.id for j in list_jobs(s, "pages", status="succeeded")[0]] == [made[0]]


def test_versions_are_immutable_and_one_per_job(sessions):
    with sessions() as s:

        def publish(job_id, data):
            return publish_version(
                s,
                tenant="acme",
                name="cat-dog",
                job_id=job_id,
                data=data,
                base_model="tiny",
                base_fingerprint="f" * 64,
                sha256="0" * 64,
                metadata={"name": "cat-dog"},
            )

        v1 = publish("job-1", b"one")
        assert publish("job-1", b"one again").id == v1.id  # a retried job does not make a second version
        v2 = publish("job-2", b"two")
        assert (v1.version, v2.version) == (1, 2)
        assert resolve(s, "acme", "cat-dog").id == v2.id and resolve(s, "acme", "cat-dog@1").id == v1.id
        assert version_bytes(s, resolve(s, "acme", "cat-dog@1")) == b"one"
        with pytest.raises(NotFound):
            resolve(s, "other", "cat-dog")
        user, _ = create_job(s, "acme", "generate", {"a": 1}, adapter_version_id=v2.id)
        with pytest.raises(Conflict, match=user.id):
            delete_version(s, "acme", "cat-dog", 2)
        finish_job(s, claim_job(s, user.id, "w", lease_s=60), "succeeded")
        delete_version(s, "acme", "cat-dog", 2)
        v3 = publish("job-3", b"three")
        assert v3.version == 3  # numbers are never reused
        assert [(a.name, n, latest.version) for a, n, latest in list_adapters(s, "acme")] == [("cat-dog", 2, 3)]


def test_adapter_refs():
    assert parse_ref("cat-dog") == ("cat-dog", None) and parse_ref("cat-dog@12") == ("cat-dog", 12)
    for bad in ("Cat", "cat@0", "cat@x", "", "-cat", "a" * 65):
        with pytest.raises(ValueError):
            parse_ref(bad)


def test_api_keys_are_hashed_and_revocable(sessions):
    with sessions() as s:
        key = create_api_key(s, "acme", "ci")
        assert key.startswith("sk_sepen_") and authenticate(s, key) == "acme"
        with pytest.raises(Unauthorized):
            authenticate(s, key + "x")
        with pytest.raises(Unauthorized):
            authenticate(s, None)
        assert revoke_api_key(s, key[:15]) == 1
        with pytest.raises(Unauthorized, match="revoked"):
            authenticate(s, key)


def test_migration_0002_moves_stored_results_to_the_typed_contract_and_back(sessions):
    from alembic import command

    from sepen_store.contract import parse_result
    from sepen_store.database import alembic_config

    generate = {
        "images": [
            {"index": 0, "seed": 3, "heatmap": True, "scores": {"peaks": {}}},
            {"index": 1, "seed": 4, "heatmap": False, "scores": None},
        ],
        "adapter": None,
        "model": "sepen-toy",
        "concepts": [],
        "sample": {},
    }
    finetune = {"adapter": "cat-dog@2", "name": "cat-dog", "version": 2, "sha256": "0" * 64, "summary": None}
    with sessions() as session:
        ids = []
        for kind, result in (("generate", generate), ("finetune", finetune)):
            job = Job(
                tenant="migrations", kind=kind, request={}, request_hash="0" * 64, status="succeeded", result=result
            )
            session.add(job)
            session.commit()
            ids.append(job.id)
    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    command.downgrade(alembic_config(url), "0001")
    try:
        with sessions() as session:
            # Only the column 0001 has: the model's newer columns (compute_s) are not there at this revision.
            old_generate, old_finetune = (session.scalar(select(Job.result).where(Job.id == i)) for i in ids)
        assert old_generate["images"][0]["url"] == f"/jobs/{ids[0]}/images/0"
        assert old_generate["images"][0]["heatmap_url"] == f"/jobs/{ids[0]}/heatmaps/0"
        assert "heatmap_url" not in old_generate["images"][1] and "heatmap" not in old_generate["images"][1]
        assert old_finetune["weights_url"] == "/adapters/cat-dog/2/weights"
    finally:
        upgrade_database(url)
    with sessions() as session:
        new_generate, new_finetune = (session.get(Job, i, populate_existing=True).result for i in ids)
    assert new_generate == generate and new_finetune == finetune
    assert parse_result("generate", new_generate).images[0].heatmap and parse_result("finetune", new_finetune)
