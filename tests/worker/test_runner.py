"""The worker's job runner in-process on the embedded database: a crash, an out-of-memory error or a
bad request ends that job with a clear error code and the runtime goes on serving."""

import pytest
import torch

from sepen_core.config import FinetuneConfig, SampleConfig
from sepen_core.prompts import ConceptSet
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.jobs import create_job, get_job
from sepen_store.settings import WorkerSettings
from worker import work as work_module
from worker.runner import Runtime


@pytest.fixture
def runtime(tmp_path):
    settings = WorkerSettings(data_dir=tmp_path, checkpoint_every=2, progress_interval_s=0.0)
    upgrade_database(settings.database_url)
    return Runtime.create(settings, session_factory(make_engine(settings.database_url)), in_process=True)


def submit(runtime, kind, request):
    with runtime.sessions() as session:
        job, _ = create_job(session, "acme", kind, request)
        return job.id


def generate_request(prompt="a photo of a cat and a dog", concepts=None):
    return {
        "prompt": prompt,
        "model": "sepen-tiny",
        "adapter": None,
        "concepts": concepts or [],
        "sample": SampleConfig(num_inference_steps=2).to_dict(),
    }


def job_row(runtime, job_id):
    with runtime.sessions() as session:
        return get_job(session, None, job_id)


def test_out_of_memory_fails_the_job_and_the_next_job_runs(runtime, monkeypatch):
    real_generate = work_module.generate

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(work_module, "generate", exhausted)
    first = submit(runtime, "generate", generate_request())
    assert runtime.run("generate", first) == "failed"
    row = job_row(runtime, first)
    assert row.error_code == "out_of_memory" and "20.00 GiB" in row.error_message

    monkeypatch.setattr(work_module, "generate", real_generate)
    second = submit(runtime, "generate", generate_request())
    assert runtime.run("generate", second) == "succeeded"
    stored = job_row(runtime, second).result  # indices, not URLs: the gateway makes the links
    assert stored["images"][0]["index"] == 0 and stored["images"][0]["heatmap"] is False
    assert "url" not in stored["images"][0]


def test_unexpected_crash_is_an_internal_error_with_its_message(runtime, monkeypatch):
    monkeypatch.setattr(work_module, "generate", lambda *a, **k: 1 / 0)
    job_id = submit(runtime, "generate", generate_request())
    assert runtime.run("generate", job_id) == "failed"
    row = job_row(runtime, job_id)
    assert row.error_code == "internal_error" and row.error_message == "ZeroDivisionError: division by zero"


def test_bad_concepts_fail_with_a_named_error(runtime):
    job_id = submit(runtime, "generate", generate_request(concepts=["cat", "dogs"]))
    assert runtime.run("generate", job_id) == "failed"
    row = job_row(runtime, job_id)
    assert row.error_code == "concept_not_found" and "'dogs'" in row.error_message
    finetune = submit(
        runtime,
        "finetune",
        {
            "adapter": "x",
            "model": "sepen-tiny",
            "concepts": ConceptSet.pairs(("cat", "dog"), templates=("a {A} and {B}s",)).to_dict(),
            "recipe": FinetuneConfig(steps=2, batch_size=1).to_dict(),
        },
    )
    assert runtime.run("finetune", finetune) == "failed"
    assert job_row(runtime, finetune).error_code == "concept_not_found"


def test_unknown_model_and_redelivered_message(runtime):
    job_id = submit(runtime, "generate", {**generate_request(), "model": "gone"})
    assert runtime.run("generate", job_id) == "failed"
    assert job_row(runtime, job_id).error_code == "model_not_found"
    assert runtime.run("generate", job_id) is None  # a redelivered message for a finished job does nothing
    assert job_row(runtime, job_id).attempts == 1
