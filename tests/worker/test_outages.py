"""Riding out outages (worker/outages.py) and what a user reads of one (worker.work.failure_of): retried with
back-off while a dependency is away, up to a grace for a job's work; any other error at once; the driver's text
(hosts, ports, buckets) never in the job's error."""

import pytest
from sqlalchemy.exc import OperationalError

from sepen_store.errors import StorageRefused, StorageUnavailable
from worker.outages import OutageTooLong, through_outages
from worker.work import failure_of

DATABASE_DOWN = OperationalError("SELECT 1", {}, Exception('connection to server at "10.1.2.3", port 5432 failed'))
STORE_DOWN = StorageUnavailable("object store: could not put 'a/b' in bucket 'sepen' at http://10.1.2.3:8333: refused")
STORE_REFUSES = StorageRefused("object store: bucket 'sepen' at http://10.1.2.3:8333 refused to store 'a/b': 403")


class Flaky:
    """A step that fails with `error` `times` times, then answers."""

    def __init__(self, error: Exception, times: int):
        self.error, self.left, self.calls = error, times, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise self.error
        return "done"


def test_an_outage_is_retried_with_back_off_until_it_ends():
    waits: list[float] = []
    step = Flaky(DATABASE_DOWN, 5)
    assert through_outages(step, sleep=waits.append) == "done"
    assert step.calls == 6 and waits == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_a_job_waits_only_its_grace_then_fails_with_the_outages_code():
    step = Flaky(STORE_DOWN, 10**6)
    with pytest.raises(OutageTooLong) as raised:
        through_outages(step, grace_s=0.2, sleep=lambda s: None)
    assert raised.value.code == "storage_unavailable" and "SEPEN_OUTAGE_GRACE_S" in str(raised.value)
    assert "10.1.2.3" not in str(raised.value) and "sepen'" not in str(raised.value)


def test_other_errors_and_other_dependencies_are_not_retried():
    step = Flaky(ValueError("a bug"), 1)
    with pytest.raises(ValueError):
        through_outages(step, sleep=lambda s: None)
    assert step.calls == 1
    store = Flaky(STORE_DOWN, 1)
    with pytest.raises(StorageUnavailable):  # the worker's own database steps wait only for the database
        through_outages(store, dependencies=("database",), sleep=lambda s: None)
    refused = Flaky(STORE_REFUSES, 1)
    with pytest.raises(StorageRefused):  # a refusal will not change by waiting
        through_outages(refused, sleep=lambda s: None)
    assert refused.calls == 1


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DATABASE_DOWN, "database_unavailable"),
        (STORE_DOWN, "storage_unavailable"),
        (STORE_REFUSES, "storage_refused"),
        (OutageTooLong("database", 301, 300), "database_unavailable"),
        (KeyError("/srv/models/secret-path"), "internal_error"),
    ],
)
def test_a_users_error_names_no_host_port_bucket_or_path(error, code):
    failure = failure_of(error)
    assert failure.code == code
    for leaked in ("10.1.2.3", "5432", "8333", "bucket", "psycopg", "/srv/models"):
        assert leaked not in str(failure), str(failure)
