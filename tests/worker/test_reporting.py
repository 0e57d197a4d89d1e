"""A running job's reporter against a Postgres server of the test's own that is stopped and started again: no call
raises or waits on the outage, the newest progress waits in memory, and the first write after it stores it. On the
shared Postgres: NaN and infinities in a progress report are stored as null, and a report that cannot be stored for
another reason than an outage is dropped and logged, not tried for ever."""

import logging
import threading
import time

import pytest

from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.jobs import claim_job, create_job, get_job
from tests.conftest import postgres_database
from tests.e2e.conftest import wait_until
from tests.postgres_server import PostgresServer
from worker.reporting import JobReporter

REQUEST = {"prompt": "a cat and a dog", "model": "sepen-tiny", "adapter": None, "concepts": [], "sample": {}}


@pytest.fixture
def database():
    server = PostgresServer()
    try:
        server.start()
        upgrade_database(server.url)
        yield server, session_factory(make_engine(server.url))
    finally:
        server.remove()


def test_progress_waits_in_memory_through_a_database_restart(database):
    server, sessions = database
    with sessions() as session:
        job, _ = create_job(session, "acme", "generate", REQUEST)
        claim = claim_job(session, job.id, "worker-1", lease_s=60)
    with JobReporter(sessions, claim, interval_s=0.0, beat_s=0.5) as reporter:
        reporter.progress({"step": 1, "total": 3})
        server.stop()
        reporter.progress({"step": 2, "total": 3})  # meets the outage: kept, not raised
        assert reporter.down_since is not None and reporter.unsaved == {"step": 2, "total": 3}
        tried_from_the_loop = []
        write = reporter._write
        reporter._write = lambda: tried_from_the_loop.append(threading.current_thread()) or write()
        reporter.progress({"step": 3, "total": 3}, force=True)
        # The job's loop never waits on a database that is away: only the heartbeat thread tries it again.
        assert threading.main_thread() not in tried_from_the_loop and reporter.unsaved == {"step": 3, "total": 3}
        assert not reporter.should_cancel()
        time.sleep(2)  # beats fail meanwhile, with back-off
        server.start()
        wait_until(lambda: reporter.down_since is None and reporter.unsaved is None, 30, "the progress to be stored")
    with sessions() as session:
        stored = get_job(session, None, job.id)
        assert stored.progress == {"step": 3, "total": 3} and stored.status == "running" and not reporter.lost


@pytest.fixture(scope="module")
def shared_sessions():
    with postgres_database("sepen_reporting") as url:
        engine = make_engine(url)
        yield session_factory(engine)
        engine.dispose()


def running_job(sessions):
    with sessions() as session:
        job, _ = create_job(session, "acme", "generate", REQUEST)
        return job, claim_job(session, job.id, "worker-1", lease_s=60)


def stored_row(sessions, job_id):
    with sessions() as session:
        return get_job(session, None, job_id)


def test_non_finite_numbers_in_progress_are_stored_as_null(shared_sessions):
    """Postgres's json refuses NaN and Infinity (a diverged loss): the report is stored with null in their place."""
    job, claim = running_job(shared_sessions)
    report = {"step": 3, "loss": float("nan"), "losses": {"separate": float("inf"), "enhance": [0.5, float("-inf")]}}
    with JobReporter(shared_sessions, claim, interval_s=0.0, beat_s=60) as reporter:
        reporter.progress(report, force=True)
        assert reporter.unsaved is None and not reporter.lost
    stored = stored_row(shared_sessions, job.id).progress
    assert stored == {"step": 3, "loss": None, "losses": {"separate": None, "enhance": [0.5, None]}}


def test_a_report_that_cannot_be_stored_is_dropped_and_logged_and_the_next_is_stored(shared_sessions, caplog):
    """Not an outage (here: bytes, which no JSON holds): trying it again would fail at every beat until the claim's
    lease lapsed. The report is dropped (the log has it and why), nothing raises into the job's loop, the beats go on,
    and the next report is stored."""
    job, claim = running_job(shared_sessions)
    with caplog.at_level(logging.ERROR, logger="worker.reporting"):
        with JobReporter(shared_sessions, claim, interval_s=0.0, beat_s=0.2) as reporter:
            reporter.progress({"step": 1, "raw": b"bytes are no JSON"}, force=True)
            assert reporter.unsaved is None and reporter.down_since is None
            beat_at = stored_row(shared_sessions, job.id).heartbeat_at
            wait_until(lambda: stored_row(shared_sessions, job.id).heartbeat_at > beat_at, 10, "a later beat")
            reporter.progress({"step": 2}, force=True)
            assert reporter.unsaved is None
    stored = stored_row(shared_sessions, job.id)
    assert stored.progress == {"step": 2} and stored.status == "running"
    (line,) = [r for r in caplog.records if "could not be stored" in r.getMessage()]
    assert job.id in line.getMessage() and line.exc_info is not None
