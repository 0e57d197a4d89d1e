"""Compute accounting and quotas in sepen_store, on both backends: each job accrues the time its attempts ran at
every heartbeat and at its end, a tenant's day sums them, the caps refuse with the time to wait; and the
migration that adds jobs.compute_s goes up (filling old rows) and down."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from sepen_store.database import alembic_config, make_engine
from sepen_store.errors import QuotaExceeded
from sepen_store.jobs import claim_job, create_job, finish_job, heartbeat, request_cancel
from sepen_store.quotas import Quotas, check_quotas, compute_seconds_today, day_start
from sepen_store.tables import Job, utcnow
from tests.conftest import postgres_database


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _set_back_heartbeat(session, job_id: str, seconds: float) -> None:
    """As if the attempt's last heartbeat was `seconds` ago."""
    row = session.get(Job, job_id, populate_existing=True)
    row.heartbeat_at = row.heartbeat_at - timedelta(seconds=seconds)
    session.commit()


def _compute(session, job_id: str) -> float:
    session.expire_all()
    return session.get(Job, job_id).compute_s


def test_a_job_accrues_its_run_time_at_each_heartbeat_and_at_its_end(sessions):
    with sessions() as s:
        tenant = _tenant()
        job, _ = create_job(s, tenant, "generate", {"n": 1})
        assert _compute(s, job.id) == 0
        claim = claim_job(s, job.id, "w1", lease_s=60)
        _set_back_heartbeat(s, job.id, 10)
        heartbeat(s, claim, {"step": 1, "total": 2})
        assert _compute(s, job.id) == pytest.approx(10, abs=1)
        _set_back_heartbeat(s, job.id, 5)
        assert finish_job(s, claim, "succeeded", result=None)
        assert _compute(s, job.id) == pytest.approx(15, abs=1)
        assert compute_seconds_today(s, tenant) == pytest.approx(15, abs=1)


def test_a_reclaimed_job_keeps_what_its_first_attempt_ran(sessions):
    with sessions() as s:
        job, _ = create_job(s, _tenant(), "finetune", {"n": 2})
        first = claim_job(s, job.id, "w1", lease_s=60)
        _set_back_heartbeat(s, job.id, 30)
        heartbeat(s, first)  # 30 s counted; then the worker dies
        _set_back_heartbeat(s, job.id, 120)  # its heartbeat goes stale
        second = claim_job(s, job.id, "w2", lease_s=60)
        assert second is not None and second.resumed
        _set_back_heartbeat(s, job.id, 20)
        assert finish_job(s, second, "failed", error_code="x", error_message="y")
        assert _compute(s, job.id) == pytest.approx(50, abs=1)  # the stale gap is nobody's compute


def test_a_day_counts_jobs_finished_today_and_those_not_finished(sessions):
    with sessions() as s:
        tenant = _tenant()
        old, _ = create_job(s, tenant, "generate", {"n": 3})
        running, _ = create_job(s, tenant, "generate", {"n": 4})
        for job, seconds in ((old, 40), (running, 7)):
            claim = claim_job(s, job.id, "w", lease_s=60)
            _set_back_heartbeat(s, job.id, seconds)
            heartbeat(s, claim)
        s.get(Job, old.id).status, s.get(Job, old.id).finished_at = "succeeded", utcnow() - timedelta(days=1)
        s.commit()
        assert compute_seconds_today(s, tenant) == pytest.approx(7, abs=1)


def test_day_start_is_midnight_utc():
    now = datetime(2026, 3, 4, 23, 30, tzinfo=UTC)
    assert day_start(now) == datetime(2026, 3, 4, tzinfo=UTC)


def test_the_queued_cap_counts_only_queued_jobs_of_the_tenant(sessions):
    with sessions() as s:
        tenant = _tenant()
        quotas = Quotas(max_queued_jobs=2)
        first, _ = create_job(s, tenant, "generate", {"n": 5}, idempotency_key="k1")
        create_job(s, _tenant(), "generate", {"n": 6})  # another tenant's
        check_quotas(s, tenant, quotas)
        create_job(s, tenant, "generate", {"n": 7})
        with pytest.raises(QuotaExceeded) as refused:
            check_quotas(s, tenant, quotas)
        assert refused.value.code == "queued_jobs_limit" and refused.value.retry_after_s > 0
        check_quotas(s, tenant, quotas, idempotency_key="k1")  # a replay stores nothing new
        request_cancel(s, tenant, first.id)
        check_quotas(s, tenant, quotas)


def test_the_compute_budget_refuses_until_midnight(sessions):
    with sessions() as s:
        tenant = _tenant()
        job, _ = create_job(s, tenant, "generate", {"n": 8})
        claim = claim_job(s, job.id, "w", lease_s=60)
        _set_back_heartbeat(s, job.id, 60)
        finish_job(s, claim, "succeeded")
        check_quotas(s, tenant, Quotas(compute_seconds_per_day=61))
        now = datetime.now(UTC).replace(hour=23, minute=0, second=0, microsecond=0)
        with pytest.raises(QuotaExceeded) as refused:
            check_quotas(s, tenant, Quotas(compute_seconds_per_day=60), now=now)
        assert refused.value.code == "compute_quota_exceeded"
        assert refused.value.retry_after_s == 3601
        check_quotas(s, tenant, Quotas())  # 0 = unlimited


def test_the_compute_migration_fills_old_rows_and_goes_down_again():
    with postgres_database("sepen_migration_test", migrate=False) as url:
        command.upgrade(alembic_config(url), "0002")
        engine = make_engine(url)
        started = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO jobs (id, tenant, kind, status, request, request_hash, cancel_requested, attempts, "
                    "created_at, started_at, finished_at) VALUES ('j1', 't', 'generate', 'succeeded', '{}', 'h', "
                    "false, 1, :started, :started, :finished)"
                ),
                {"started": started, "finished": started + timedelta(seconds=90)},
            )
        command.upgrade(alembic_config(url), "head")
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT compute_s FROM jobs")).scalar() == pytest.approx(90)
        command.downgrade(alembic_config(url), "0002")
        columns = {column["name"] for column in sa.inspect(engine).get_columns("jobs")}
        indexes = {index["name"] for index in sa.inspect(engine).get_indexes("jobs")}
        assert "compute_s" not in columns and "ix_jobs_tenant_status" not in indexes
        command.upgrade(alembic_config(url), "head")
        engine.dispose()
