"""A finetune's checkpoints with SEPEN_BLOB_BACKEND=s3, in a real S3-compatible server (SeaweedFS, tests/seaweedfs.py):
the worker's own code keeps one object per job, rewritten every SEPEN_CHECKPOINT_EVERY steps, resumes from it, and
deletes it when the job ends; the worker's retention thread deletes old images."""

import time

import pytest

from sepen_core.errors import Canceled
from sepen_core.prompts import ConceptSet
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.jobs import create_job, get_job
from sepen_store.object_store import object_store_for
from sepen_store.settings import WorkerSettings
from worker.main import start_retention
from worker.runner import Runtime

STEPS = 8
RECIPE = {"steps": STEPS, "batch_size": 1}


@pytest.fixture
def runtime(tmp_path, s3_server, s3_bucket):
    settings = WorkerSettings(
        data_dir=tmp_path, checkpoint_every=2, progress_interval_s=0.0, **s3_server.settings(s3_bucket)
    )
    upgrade_database(settings.database_url)
    store = object_store_for(settings)
    runtime = Runtime.create(
        settings, session_factory(make_engine(settings.database_url), blobs=store), in_process=True
    )
    yield runtime
    store.close()


def submit_finetune(runtime, name):
    request = {
        "adapter": name,
        "model": "sepen-tiny",
        "concepts": ConceptSet.pairs(("cat", "dog")).to_dict(),
        "recipe": RECIPE,
    }
    with runtime.sessions() as session:
        job, _ = create_job(session, "acme", "finetune", request)
        return job.id


class Watch:
    """A JobControl that looks in the bucket after every training step, and stops the run after `stop_after` steps."""

    def __init__(self, s3_server, bucket, stop_after=None):
        self.s3_server, self.bucket, self.stop_after = s3_server, bucket, stop_after
        self.steps = 0
        self.seen: list[tuple[int, list[str], str | None]] = []  # (step, checkpoint keys, the object's ETag)

    def progress(self, progress, *, force=False):
        if progress.get("phase", "training") != "training":  # loading (step 0) and checking report no new step
            return
        self.steps = progress["step"]
        keys = self.s3_server.keys(self.bucket, "checkpoints/")
        etag = None
        if keys:
            etag = self.s3_server.client().head_object(Bucket=self.bucket, Key=keys[0])["ETag"]
        self.seen.append((self.steps, keys, etag))

    def should_cancel(self):
        return self.stop_after is not None and self.steps >= self.stop_after


def test_a_finetune_rewrites_one_checkpoint_object_and_resumes_from_it(runtime, s3_server, s3_bucket):
    job_id = submit_finetune(runtime, "cat-dog")
    work = runtime.jobs.work
    first = Watch(s3_server, s3_bucket, stop_after=5)
    with pytest.raises(Canceled):  # an attempt that ends after step 5 (its worker died)
        work.run("finetune", job_id, False, first)
    key = f"checkpoints/{job_id}.tar"
    assert {tuple(keys) for _, keys, _ in first.seen} == {(), (key,)}  # none before the first write, then one
    etags = [etag for _, _, etag in first.seen if etag]
    assert len(set(etags)) == 2  # written at steps 2 and 4: the same object, its bytes replaced
    assert s3_server.keys(s3_bucket) == [key]

    second = Watch(s3_server, s3_bucket)
    result = work.run("finetune", job_id, True, second)  # the next attempt, on any worker, reads the bucket
    assert result.summary.resumed_from_step == 4 and second.seen[0][0] == 5
    assert all(keys == [key] for _, keys, _ in second.seen)  # never a second checkpoint object
    assert len({etag for _, _, etag in second.seen}) == 2  # the one of step 4, then rewritten at step 6
    published = [k for k in s3_server.keys(s3_bucket) if k.startswith("adapters/")]
    assert len(published) == 1 and s3_server.keys(s3_bucket) == sorted([key, *published])


def test_the_runner_deletes_the_checkpoint_object_when_the_job_ends(runtime, s3_server, s3_bucket):
    job_id = submit_finetune(runtime, "cat-dog")
    assert runtime.run("finetune", job_id) == "succeeded"
    keys = s3_server.keys(s3_bucket)
    assert len(keys) == 1 and keys[0].startswith("adapters/")  # the adapter stays, the checkpoint went


def test_the_worker_applies_image_retention_by_itself(tmp_path, s3_server, s3_bucket):
    settings = WorkerSettings(
        data_dir=tmp_path,
        image_retention_days=1 / 86_400,  # a second
        retention_interval_s=0.2,
        **s3_server.settings(s3_bucket),
    )
    upgrade_database(settings.database_url)
    store = object_store_for(settings)
    runtime = Runtime.create(
        settings, session_factory(make_engine(settings.database_url), blobs=store), in_process=True
    )
    sample = {"num_inference_steps": 2, "num_images": 1, "seed": 0}
    request = {"prompt": "a cat and a dog", "model": "sepen-tiny", "adapter": None, "concepts": [], "sample": sample}
    with runtime.sessions() as session:
        job, _ = create_job(session, "acme", "generate", request)
    assert runtime.run("generate", job.id) == "succeeded"
    assert len(s3_server.keys(s3_bucket, f"images/{job.id}/")) == 1
    start_retention(runtime)
    deadline = time.monotonic() + 30
    while s3_server.keys(s3_bucket) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert s3_server.keys(s3_bucket) == []
    with runtime.sessions() as session:
        assert get_job(session, None, job.id).status == "succeeded"  # the job row stays
    store.close()
