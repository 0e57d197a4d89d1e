"""A worker's metrics from jobs run in a real job process: jobs finished by kind and status, their durations, a
finetune's step times, the job process's cache hits and misses (sent back with each Outcome, picklable); and the
job id on the JSON log lines of the job process and of the worker's heartbeat thread."""

import json
import logging
import pickle
from types import SimpleNamespace

import pytest

from sepen_core.config import FinetuneConfig, SampleConfig
from sepen_core.prompts import ConceptSet
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.jobs import Claim, create_job, get_job
from sepen_store.logs import JsonFormatter, job_logging
from sepen_store.registry import resolve
from sepen_store.settings import WorkerSettings
from tests.e2e.conftest import wait_until
from worker.metrics import JobUsage, StepTimer, WorkerMetrics
from worker.protocol import Outcome
from worker.reporting import JobReporter
from worker.runner import Runtime

FINETUNE_STEPS = 3


@pytest.fixture
def runtime(tmp_path):
    settings = WorkerSettings(data_dir=tmp_path, progress_interval_s=0.0, log_format="json")
    upgrade_database(settings.database_url)
    runtime = Runtime.create(settings, session_factory(make_engine(settings.database_url)))
    yield runtime
    runtime.close()


def submit(runtime, kind, request, adapter_version_id=None):
    with runtime.sessions() as session:
        return create_job(session, "acme", kind, request, adapter_version_id=adapter_version_id)[0].id


def value(metrics: WorkerMetrics, name: str, **labels) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


def test_jobs_steps_and_cache_hits_are_counted(runtime, capfd):
    metrics = runtime.metrics
    finetune = submit(
        runtime,
        "finetune",
        {
            "adapter": "cat-dog",
            "model": "sepen-tiny",
            "concepts": ConceptSet.pairs(("cat", "dog")).to_dict(),
            "recipe": FinetuneConfig(steps=FINETUNE_STEPS, batch_size=1).to_dict(),
        },
    )
    assert runtime.run("finetune", finetune) == "succeeded"
    assert value(metrics, "sepen_worker_jobs_finished_total", kind="finetune", status="succeeded") == 1
    assert value(metrics, "sepen_worker_job_duration_seconds_count", kind="finetune", status="succeeded") == 1
    assert value(metrics, "sepen_worker_job_duration_seconds_sum", kind="finetune", status="succeeded") > 0
    assert value(metrics, "sepen_worker_finetune_step_seconds_count") == FINETUNE_STEPS
    assert value(metrics, "sepen_worker_cache_misses_total", cache="model") == 1

    with runtime.sessions() as session:
        version_id = resolve(session, "acme", "cat-dog@1").id
    request = {
        "prompt": "a cat and a dog",
        "model": "sepen-tiny",
        "adapter": "cat-dog@1",
        "concepts": [],
        "sample": SampleConfig(num_inference_steps=2).to_dict(),
    }
    for _ in range(2):
        job_id = submit(runtime, "generate", request, adapter_version_id=version_id)
        assert runtime.run("generate", job_id) == "succeeded"
    assert value(metrics, "sepen_worker_jobs_finished_total", kind="generate", status="succeeded") == 2
    assert value(metrics, "sepen_worker_job_duration_seconds_count", kind="generate", status="succeeded") == 2
    assert value(metrics, "sepen_worker_finetune_step_seconds_count") == FINETUNE_STEPS  # generate steps are not
    assert value(metrics, "sepen_worker_cache_hits_total", cache="model") == 2
    assert value(metrics, "sepen_worker_cache_misses_total", cache="model") == 1  # loaded once, by the finetune
    assert value(metrics, "sepen_worker_cache_misses_total", cache="adapter") == 1
    assert value(metrics, "sepen_worker_cache_hits_total", cache="adapter") == 1
    assert value(metrics, "sepen_worker_gpu_max_memory_allocated_bytes", kind="generate") == 0  # on the CPU: absent

    failing = submit(runtime, "generate", {**request, "adapter": None, "concepts": ["cat", "dogs"]})
    assert runtime.run("generate", failing) == "failed"
    assert value(metrics, "sepen_worker_job_failures_total", kind="generate", code="concept_not_found") == 1
    assert value(metrics, "sepen_worker_jobs_finished_total", kind="generate", status="failed") == 1

    # The job process's lines are JSON and name the job they were written for.
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    failed = [line for line in lines if line["message"].startswith(f"job {failing} failed")]
    assert failed and failed[0]["job_id"] == failing and failed[0]["process"] == "job process", lines[-5:]
    with runtime.sessions() as session:
        assert get_job(session, None, failing).error_code == "concept_not_found"


def test_an_outcome_with_its_stats_survives_the_pipe():
    outcome = Outcome("succeeded", {"images": []}, stats={"model_cache_hits": 1, "gpu_max_memory_allocated_bytes": 7})
    assert pickle.loads(pickle.dumps(outcome)) == outcome
    assert Outcome("canceled").stats == {}


class Reporter:
    def __init__(self):
        self.seen = []

    def progress(self, progress, *, force=False):
        self.seen.append((progress, force))

    def should_cancel(self):
        return False


def test_step_times_come_from_the_elapsed_seconds_between_reports():
    metrics = WorkerMetrics()
    reporter = Reporter()
    timer = metrics.watch("finetune", reporter)
    assert isinstance(timer, StepTimer) and metrics.watch("generate", reporter) is reporter
    # A resumed run: its first report is step 11, elapsed since the resume; then a report that covers two steps.
    for step, elapsed in ((11, 0.5), (12, 1.5), (14, 5.5)):
        timer.progress({"step": step, "total": 20, "elapsed_s": elapsed}, force=step == 14)
    assert [force for _, force in reporter.seen] == [False, False, True]  # passed on unchanged
    assert metrics.registry.get_sample_value("sepen_worker_finetune_step_seconds_count") == 4
    assert metrics.registry.get_sample_value("sepen_worker_finetune_step_seconds_sum") == pytest.approx(5.5)
    bucket = metrics.registry.get_sample_value("sepen_worker_finetune_step_seconds_bucket", {"le": "1.0"})
    assert bucket == 2  # 0.5 and 1.0; the two 2.0 s steps are above
    assert not timer.should_cancel()


class Captured(logging.Handler):
    """Formats each line as it is written (in the writing thread, where the job id is known)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(JsonFormatter("worker"))
        self.lines: list[dict] = []

    def emit(self, record):
        self.lines.append(json.loads(self.format(record)))


def test_the_heartbeat_thread_logs_with_the_job_id():
    def unreachable():
        raise ConnectionError("the database is away")

    captured = Captured()
    logger = logging.getLogger("worker.reporting")
    logger.addHandler(captured)
    try:
        with job_logging("a" * 32):
            reporter = JobReporter(unreachable, Claim("a" * 32, 1, False), interval_s=1.0, beat_s=0.05)
        with reporter:  # entered outside the job's context: the thread keeps the context it was made in
            wait_until(lambda: captured.lines, 5, "a failed heartbeat")
    finally:
        logger.removeHandler(captured)
    line = captured.lines[0]
    assert line["message"] == f"heartbeat of job {'a' * 32} failed" and line["job_id"] == "a" * 32
    assert "ConnectionError: the database is away" in line["exception"]


def test_peak_gpu_memory_is_reported_only_for_a_cuda_device(monkeypatch):
    """No GPU here: torch.cuda's counters stand in, to check what JobUsage reads and what the worker shows."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: calls.append(("peak", device)) or 3 << 30)
    cache = SimpleNamespace(hits=0, misses=0)
    on_cpu = SimpleNamespace(settings=SimpleNamespace(device="cpu"), models=cache, adapters=cache)
    assert JobUsage(on_cpu).stats() == dict.fromkeys(
        ("model_cache_hits", "model_cache_misses", "adapter_cache_hits", "adapter_cache_misses"), 0
    )
    assert calls == []
    on_gpu = SimpleNamespace(settings=SimpleNamespace(device="cuda:1"), models=cache, adapters=cache)
    usage = JobUsage(on_gpu)
    cache.hits += 1
    stats = usage.stats()
    assert stats["gpu_max_memory_allocated_bytes"] == 3 << 30 and stats["model_cache_hits"] == 1
    assert calls == [("reset", torch.device("cuda:1")), ("peak", torch.device("cuda:1"))]

    metrics = WorkerMetrics()
    metrics.job_finished("generate", Outcome("succeeded", stats=stats), 2.0)
    memory = metrics.registry.get_sample_value("sepen_worker_gpu_max_memory_allocated_bytes", {"kind": "generate"})
    assert memory == 3 << 30
