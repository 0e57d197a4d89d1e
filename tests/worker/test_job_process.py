"""Jobs run in the worker's child job process: errors keep their codes, a time limit or a cancel stops a job
inside one long step within seconds, a fresh process takes the stopped one's place, and a job reclaimed
after its worker died keeps its cancel request."""

import multiprocessing
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from sepen_core.config import SampleConfig
from sepen_core.prompts import ConceptSet
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.job_outputs import get_image
from sepen_store.jobs import claim_job, create_job, get_job, request_cancel
from sepen_store.settings import WorkerSettings
from sepen_store.tables import Job, utcnow
from worker.protocol import Done, JobToRun, Outcome, Progress, RunBatch, Started
from worker.reporting import JobReporter
from worker.runner import Runtime

# One denoising step of the tiny model at 256x256 with two images takes about a minute on a 2-core CPU: a job
# that stays inside one step for far longer than the limits below.
LONG_STEP_S = 60
# The bounds on how long stopping takes leave room for a loaded machine (a 2-core CI machine running two test workers
# beside other jobs: a slow process start, slow database writes) and stay well under one long step.
STOPPED_WITHIN_S = LONG_STEP_S / 2
LONG_STEP = SampleConfig(num_inference_steps=1, height=256, width=256, num_images=2).to_dict()
SHORT = SampleConfig(num_inference_steps=2).to_dict()


@pytest.fixture
def make_runtime(tmp_path):
    runtimes = []

    def make(**settings):
        worker_settings = WorkerSettings(data_dir=tmp_path, progress_interval_s=0.0, job_lease_s=4, **settings)
        upgrade_database(worker_settings.database_url)
        runtime = Runtime.create(worker_settings, session_factory(make_engine(worker_settings.database_url)))
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in runtimes:
        runtime.close()


def submit(runtime, sample, concepts=()):
    request = {"prompt": "a cat and a dog", "model": "sepen-tiny", "adapter": None, "concepts": list(concepts)}
    with runtime.sessions() as session:
        return create_job(session, "acme", "generate", {**request, "sample": sample})[0].id


def row(runtime, job_id):
    with runtime.sessions() as session:
        return get_job(session, None, job_id)


def test_jobs_run_in_one_reused_process_and_errors_keep_their_codes(make_runtime):
    runtime = make_runtime()
    ok = submit(runtime, SHORT)
    assert runtime.run("generate", ok) == "succeeded"
    first_pid = runtime.jobs.pid
    with runtime.sessions() as session:
        assert get_image(session, ok, "image", 0).data[:8] == b"\x89PNG\r\n\x1a\n"
    assert row(runtime, ok).progress == {"step": 2, "total": 2}

    bad = submit(runtime, SHORT, concepts=["cat", "dogs"])
    assert runtime.run("generate", bad) == "failed"
    assert row(runtime, bad).error_code == "concept_not_found" and "'dogs'" in row(runtime, bad).error_message
    assert runtime.jobs.pid == first_pid  # a failed job does not cost the process its loaded models


def test_a_time_limit_stops_a_job_inside_one_long_step(make_runtime, monkeypatch):
    runtime = make_runtime()
    warm = submit(runtime, SHORT)  # the job process started, its imports done and the model loaded: not timed
    assert runtime.run("generate", warm) == "succeeded"
    monkeypatch.setattr(runtime, "time_limit_s", lambda kind: 3)  # from here on (a loaded machine starts slowly)
    old_pid = runtime.jobs.pid
    long_job = submit(runtime, LONG_STEP)
    started = time.monotonic()
    assert runtime.run("generate", long_job) == "failed"
    assert time.monotonic() - started < STOPPED_WITHIN_S  # the 3 s limit and the stop, not the minute-long step
    failed = row(runtime, long_job)
    assert failed.error_code == "time_limit_exceeded" and "SEPEN_GENERATE_TIME_LIMIT_S" in failed.error_message
    assert (failed.progress or {}).get("step", 0) == 0  # its one step never finished

    after = submit(runtime, SHORT)
    assert runtime.run("generate", after) == "succeeded"  # a fresh job process took the stopped one's place
    assert runtime.jobs.pid not in (None, old_pid)


def test_cancel_stops_a_job_inside_one_long_step_within_seconds(make_runtime):
    runtime = make_runtime(cancel_grace_s=1)
    job_id = submit(runtime, LONG_STEP)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("status", runtime.run("generate", job_id)))
    thread.start()
    deadline = time.monotonic() + 60
    while row(runtime, job_id).status != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)
    time.sleep(2)  # well inside its one step
    with runtime.sessions() as session:
        request_cancel(session, "acme", job_id)
    asked = time.monotonic()
    thread.join(30)
    assert not thread.is_alive() and outcome["status"] == "canceled"
    assert time.monotonic() - asked < STOPPED_WITHIN_S  # a heartbeat (1 s at most) + the 1 s grace + the stop
    assert row(runtime, job_id).status == "canceled"


def test_a_reclaimed_job_keeps_its_cancel_request(make_runtime):
    runtime = make_runtime()
    job_id = submit(runtime, LONG_STEP)
    with runtime.sessions() as session:
        assert claim_job(session, job_id, "a-worker-that-dies", lease_s=4) is not None
        assert request_cancel(session, "acme", job_id).status == "canceling"
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        session.commit()
    started = time.monotonic()
    assert runtime.run("generate", job_id) == "canceled"
    assert time.monotonic() - started < STOPPED_WITHIN_S  # ended without running its minute-long step
    done = row(runtime, job_id)
    assert done.status == "canceled" and done.attempts == 2 and done.result is None


def finetune_request(adapter: str) -> dict:
    concepts = ConceptSet.pairs(("cat", "dog"), templates=("a {A} and a {B}",)).to_dict()
    return {"adapter": adapter, "model": "sepen-tiny", "concepts": concepts, "recipe": {"steps": 2}}


def test_a_message_of_another_batch_is_dropped(make_runtime):
    """What a batch the worker gave up on left in the pipe is never read as the running batch's."""
    process = make_runtime().jobs
    ours, theirs = multiprocessing.Pipe()
    process._conn = ours
    batch = RunBatch("new", "finetune", (JobToRun("job-b", False),))
    theirs.send(Progress("old", "job-a", {"step": 1, "total": 60}))
    theirs.send(Done("old", ("job-a",), (Outcome("succeeded", {"images": []}),)))
    theirs.send(Started("new"))
    assert process._receive(batch) is None and process._receive(batch) is None
    assert process._receive(batch) == Started("new")


def test_an_error_in_the_worker_stops_the_job_process_and_the_next_job_gets_its_own_result(make_runtime, monkeypatch):
    """The worker's side of a batch fails (here its first progress write raises what is not an outage): the job
    process is stopped and the job finished as an internal error, so the next job, a finetune, gets a finetune's
    result and progress, not the abandoned generate's."""
    runtime = make_runtime()
    runtime.jobs.start()
    child = runtime.jobs._process
    real_progress = JobReporter.progress

    def progress_once_failing(reporter, progress, *, force=False):
        if reporter.claim.job_id == abandoned:
            raise RuntimeError("a bug on the worker's side")
        real_progress(reporter, progress, force=force)

    monkeypatch.setattr(JobReporter, "progress", progress_once_failing)
    abandoned = submit(runtime, SampleConfig(num_inference_steps=40).to_dict())
    assert runtime.run("generate", abandoned) == "failed"  # finished as an internal error, not left running
    assert row(runtime, abandoned).error_code == "internal_error"
    assert runtime.jobs.pid is None and not child.is_alive()  # stopped, not left sampling the abandoned job

    with runtime.sessions() as session:
        finetune, _ = create_job(session, "globex", "finetune", finetune_request("after"))
    assert runtime.run("finetune", finetune.id) == "succeeded"
    done = row(runtime, finetune.id)
    assert done.result["adapter"] == "after@1" and done.progress["step"] == done.progress["total"] == 2
