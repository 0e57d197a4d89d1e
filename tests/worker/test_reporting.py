"""A running job's reporter against a Postgres server of the test's own that is stopped and started again: no call
raises or waits on the outage, the newest progress waits in memory, and the first write after it stores it."""

import threading
import time

import pytest

from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.jobs import claim_job, create_job, get_job
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
