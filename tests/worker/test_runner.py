"""The worker's job runner in-process on the embedded database: a crash, an out-of-memory error or a
bad request ends that job with a clear error code and the runtime goes on serving; the images it stores carry
A1111's parameters."""

import io
import logging
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.checkpoints import write_checkpoint
from sepen_core.config import FinetuneConfig, SampleConfig
from sepen_core.finetuning import run_fingerprint
from sepen_core.models import build_tiny_model
from sepen_core.prompts import ConceptSet
from sepen_store.contract import GenerateResult
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.errors import StoreError
from sepen_store.job_outputs import get_image, load_checkpoint, save_checkpoint
from sepen_store.jobs import claim_job, create_job, finish_job, get_job
from sepen_store.quotas import COMPUTE_QUOTA_EXCEEDED
from sepen_store.registry import resolve, version_bytes
from sepen_store.retention import apply_retention
from sepen_store.settings import WorkerSettings
from tests.interop import parse_a1111, publish_adapter, spectral_adapter
from worker import reporting
from worker import work as work_module
from worker.engine import ProtocolError
from worker.protocol import Outcome
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
    real_generate = work_module.generate_batch

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(work_module, "generate_batch", exhausted)
    first = submit(runtime, "generate", generate_request())
    assert runtime.run("generate", first) == "failed"
    row = job_row(runtime, first)
    assert row.error_code == "out_of_memory" and "20.00 GiB" in row.error_message

    monkeypatch.setattr(work_module, "generate_batch", real_generate)
    second = submit(runtime, "generate", generate_request())
    assert runtime.run("generate", second) == "succeeded"
    stored = job_row(runtime, second).result  # indices, not URLs: the gateway makes the links
    assert stored["images"][0]["index"] == 0 and stored["images"][0]["heatmap"] is False
    assert "url" not in stored["images"][0]


def test_unexpected_crash_is_an_internal_error_logged_with_its_traceback(runtime, monkeypatch, caplog):
    monkeypatch.setattr(work_module, "generate_batch", lambda *a, **k: 1 / 0)
    job_id = submit(runtime, "generate", generate_request())
    assert runtime.run("generate", job_id) == "failed"
    row = job_row(runtime, job_id)
    # The user reads that it was the service's fault; the exception's own text (paths, hosts) only goes to the log.
    assert row.error_code == "internal_error" and "internal error" in row.error_message
    assert "ZeroDivisionError" not in row.error_message
    logged = [r for r in caplog.records if r.getMessage().startswith(f"job {job_id} failed (internal_error)")]
    assert logged and logged[0].exc_info[0] is ZeroDivisionError


class FailingRun:
    """Where the work runs, failing on the worker's side of the run (as a ProtocolError from the job process, or a
    progress write that raised, did): the job must still end."""

    def run(self, kind, claims, reporters, time_limit_s):
        raise ProtocolError("batch 0 ended with the outcomes of jobs ()")

    def close(self) -> None:
        pass


def test_an_error_on_the_workers_side_of_a_run_fails_the_job_as_an_internal_error(runtime, caplog):
    """Left running, the job would be sent again when its lease lapsed, and fail again, for ever."""
    runtime.jobs = FailingRun()
    job_id = submit(runtime, "generate", generate_request())
    with caplog.at_level(logging.ERROR, logger="worker.runner"):
        assert runtime.run("generate", job_id) == "failed"
    row = job_row(runtime, job_id)
    assert row.error_code == "internal_error" and "ProtocolError" not in row.error_message
    (line,) = [r for r in caplog.records if job_id in r.getMessage()]
    assert line.exc_info is not None and isinstance(line.exc_info[1], ProtocolError)


class ReportsThenStops:
    """Where the work runs: two progress reports, the second (throttled, so still unsaved at the end) one that no
    JSON holds, then the job ends canceled."""

    def run(self, kind, claims, reporters, time_limit_s):
        reporters[0].progress({"step": 1, "total": 2})
        reporters[0].progress({"step": 2, "total": 2, "raw": b"bytes are no JSON"})
        return [Outcome("canceled")]

    def close(self) -> None:
        pass


def test_an_end_whose_last_progress_cannot_be_stored_is_recorded_without_it(tmp_path):
    settings = WorkerSettings(data_dir=tmp_path, progress_interval_s=600.0)
    upgrade_database(settings.database_url)
    runtime = Runtime(settings, session_factory(make_engine(settings.database_url)), ReportsThenStops())
    job_id = submit(runtime, "generate", generate_request())
    assert runtime.run("generate", job_id) == "canceled"
    row = job_row(runtime, job_id)
    assert row.status == "canceled" and row.progress == {"step": 1, "total": 2}


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


def test_a_result_of_another_kind_is_never_stored_as_the_jobs(runtime, monkeypatch):
    """Whatever mix-up hands a finetune a generate's result, the runner checks the result against the job's kind
    before storing it: the job fails as an internal error instead of succeeding with someone else's images."""
    images = GenerateResult(images=[], adapter=None, model="sepen-tiny", concepts=[], sample={})
    monkeypatch.setattr(work_module.Work, "finetune", lambda self, job_id, resumed, control: images)
    concepts = ConceptSet.pairs(("cat", "dog")).to_dict()
    job_id = submit(
        runtime, "finetune", {"adapter": "mixed-up", "model": "sepen-tiny", "concepts": concepts, "recipe": {}}
    )
    assert runtime.run("finetune", job_id) == "failed"
    row = job_row(runtime, job_id)
    assert row.result is None and row.error_code == "internal_error"


def test_unknown_model_and_redelivered_message(runtime):
    job_id = submit(runtime, "generate", {**generate_request(), "model": "gone"})
    assert runtime.run("generate", job_id) == "failed"
    assert job_row(runtime, job_id).error_code == "model_not_found"
    assert runtime.run("generate", job_id) is None  # a redelivered message for a finished job does nothing
    assert job_row(runtime, job_id).attempts == 1


def test_generated_images_carry_a1111_parameters_naming_the_adapter_version(runtime):
    adapter = spectral_adapter(build_tiny_model(seed=0))  # the worker's sepen-tiny: the same base keys
    with runtime.sessions() as session:
        version = publish_adapter(session, adapter, "cat-dog")
        request = {**generate_request(), "adapter": "cat-dog@1"}
        job_id = create_job(session, "acme", "generate", request, adapter_version_id=version.id)[0].id
    assert runtime.run("generate", job_id) == "succeeded"
    with runtime.sessions() as session:
        image = Image.open(io.BytesIO(get_image(session, job_id, "image", 0).data))
    assert image.text["adapter"] == "cat-dog@1" and image.text["job"] == job_id
    fields = parse_a1111(image.text["parameters"])
    assert fields["Prompt"] == "a photo of a cat and a dog" and fields["SepEn adapter"] == "cat-dog@1"
    assert fields["Model"] == "sepen-tiny" and fields["Sampler"] == "DDIM" and fields["Steps"] == "2"
    assert (fields["Seed"], fields["Size-1"], fields["Size-2"]) == ("0", "64", "64")


def test_a_finetune_that_crosses_the_daily_compute_budget_stops_and_the_same_request_resumes(tmp_path, monkeypatch):
    """Its tenant's day passes SEPEN_COMPUTE_SECONDS_PER_DAY while it trains: the job fails compute_quota_exceeded
    within a quota check and a step, its checkpoint stays (retention keeps it too), and the same request sent again
    (here once the budget is raised) starts from that checkpoint instead of step 0, then drops it."""
    monkeypatch.setattr(reporting, "QUOTA_CHECK_S", 0.2)
    settings = WorkerSettings(data_dir=tmp_path, checkpoint_every=2, progress_interval_s=0.0, compute_seconds_per_day=3)
    upgrade_database(settings.database_url)
    sessions = session_factory(make_engine(settings.database_url))
    runtime = Runtime.create(settings, sessions, in_process=True)
    concepts = ConceptSet.pairs(("cat", "dog")).to_dict()
    request = {
        "adapter": "budget",
        "model": "sepen-tiny",
        "concepts": concepts,
        "recipe": {"steps": 300, "batch_size": 1},
    }
    stopped = submit(runtime, "finetune", request)
    assert runtime.run("finetune", stopped) == "failed"
    row = job_row(runtime, stopped)
    assert row.error_code == "compute_quota_exceeded" and "resumes from it" in row.error_message
    stopped_at = row.progress["step"]
    assert 2 <= stopped_at < 300
    with sessions() as session:
        assert apply_retention(session, image_days=0, checkpoint_days=7).checkpoints == 0
        kept_step, _ = load_checkpoint(session, stopped)
    assert 2 <= kept_step <= stopped_at

    unlimited = Runtime.create(settings.with_(compute_seconds_per_day=0), sessions, in_process=True)
    again = submit(unlimited, "finetune", request)
    assert unlimited.run("finetune", again) == "succeeded"
    done = job_row(unlimited, again)
    assert done.result["summary"]["resumed_from_step"] == kept_step and done.result["adapter"] == "budget@1"
    with sessions() as session:
        assert load_checkpoint(session, stopped) is None and load_checkpoint(session, again) is None


SHORT_FINETUNE = {
    "adapter": "again",
    "model": "sepen-tiny",
    "concepts": ConceptSet.pairs(("cat", "dog")).to_dict(),
    "recipe": {"steps": 4, "batch_size": 1},
}


def quota_stopped(runtime, request: dict, checkpoint_state: dict) -> str:
    """A finetune of `request` that the compute quota stopped, leaving a checkpoint at step 2 of the sepen-tiny keys
    with this JSON state."""
    job_id = submit(runtime, "finetune", request)
    model = runtime.jobs.work.models.get("sepen-tiny")
    params = {name: torch.nn.Parameter(weight.detach().clone()) for name, weight in model.base_keys.items()}
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(Path(directory), 2, params, torch.optim.AdamW(params.values()), checkpoint_state)
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(Path(directory).iterdir()):
                tar.add(path, arcname=path.name)
    with runtime.sessions() as session:
        claim = claim_job(session, job_id, "worker-0", lease_s=60)
        finish_job(session, claim, "failed", error_code=COMPUTE_QUOTA_EXCEEDED, error_message="stopped by the quota")
        save_checkpoint(session, job_id, 2, buffer.getvalue())
    return job_id


def test_a_stopped_predecessors_checkpoint_of_another_run_is_left_and_the_finetune_starts_at_step_0(runtime, caplog):
    """The same request stopped by the quota under other model defaults left a checkpoint of another run: resuming
    from it would fail the request with checkpoint_mismatch each time it is sent. The job starts at step 0 instead."""
    stopped = quota_stopped(runtime, SHORT_FINETUNE, {"run": "0" * 64, "history": []})
    again = submit(runtime, "finetune", SHORT_FINETUNE)
    with caplog.at_level(logging.WARNING, logger="worker.work"):
        assert runtime.run("finetune", again) == "succeeded", job_row(runtime, again).error_message
    assert job_row(runtime, again).result["summary"]["resumed_from_step"] == 0
    assert any(stopped in r.getMessage() and "starting from step 0" in r.getMessage() for r in caplog.records)
    with runtime.sessions() as session:
        assert load_checkpoint(session, stopped) is not None  # not this run's to delete


def test_a_checkpoint_of_a_stopped_predecessor_that_cannot_be_deleted_fails_nothing(runtime, monkeypatch, caplog):
    """The job resumes from the predecessor's checkpoint and publishes; the delete of that checkpoint afterwards fails
    (here: the store refuses it): the job succeeds all the same, and the log says so."""
    model = runtime.jobs.work.models.get("sepen-tiny")
    concepts = ConceptSet.from_dict(SHORT_FINETUNE["concepts"])
    config = model.defaults.finetune_config(concepts.mode, SHORT_FINETUNE["recipe"])
    stopped = quota_stopped(runtime, SHORT_FINETUNE, {"run": run_fingerprint(model, concepts, config), "history": []})

    def refused(session, job_id):
        raise StoreError(f"the store refused to delete the checkpoint of job {job_id}")

    monkeypatch.setattr(work_module, "delete_checkpoint", refused)
    again = submit(runtime, "finetune", SHORT_FINETUNE)
    with caplog.at_level(logging.WARNING, logger="worker.work"):
        assert runtime.run("finetune", again) == "succeeded", job_row(runtime, again).error_message
    assert job_row(runtime, again).result["summary"]["resumed_from_step"] == 2
    (line,) = [r for r in caplog.records if "could not delete the checkpoint" in r.getMessage()]
    assert stopped in line.getMessage() and isinstance(line.exc_info[1], StoreError)


def test_every_finetune_ends_with_its_do_no_harm_check(runtime):
    """On the toy model (it has a judge): the check's verdict and per-pair and per-noun numbers are in the job's
    result, in the version's metadata and in the adapter file; check_samples 0 turns it off."""
    concepts = ConceptSet.pairs(("ball", "bench")).to_dict()
    request = {"adapter": "checked", "model": "sepen-toy", "concepts": concepts}
    job_id = submit(runtime, "finetune", {**request, "recipe": {"steps": 2, "batch_size": 1, "check_samples": 2}})
    assert runtime.run("finetune", job_id) == "succeeded"
    check = job_row(runtime, job_id).result["summary"]["check"]
    assert check["verdict"] in ("helps", "no clear effect", "hurts") and check["samples_per_prompt"] == 2
    assert [row["concepts"] for row in check["pairs"]] == [["ball", "bench"]]
    assert [row["concepts"] for row in check["nouns"]] == [["ball"], ["bench"]]
    assert check["images"] == 2 * 2 * 4 and check["pairs"][0]["paired"] is not None
    with runtime.sessions() as session:
        version = resolve(session, "acme", "checked@1")
        stored = KeyProjectionAdapter.from_bytes(version_bytes(session, version))
    assert version.meta["summary"]["check"] == check == stored.metadata["summary"]["check"]

    unchecked = submit(runtime, "finetune", {**request, "recipe": {"steps": 2, "batch_size": 1, "check_samples": 0}})
    assert runtime.run("finetune", unchecked) == "succeeded"
    assert job_row(runtime, unchecked).result["summary"]["check"] is None
