"""A worker's Prometheus metrics, served by `sepen-worker` at http://HOST:PORT/metrics (SEPEN_WORKER_METRICS_PORT):
jobs finished by kind and status, their durations, finetune step times (from the progress the job process sends),
and the job process's model and adapter cache hits and peak GPU memory, which each job's Outcome carries back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from worker.protocol import Outcome
    from worker.work import Work

KINDS = ("finetune", "generate", "evaluate")
FINISHED = ("succeeded", "failed", "canceled")
CACHES = ("model", "adapter")
# A generate job takes seconds to minutes, an evaluation or a finetune minutes to hours.
DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200)
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class WorkerMetrics:
    """One worker process's metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.finished = Counter(
            "sepen_worker_jobs_finished",
            "jobs this worker finished, by kind and status",
            ("kind", "status"),
            registry=registry,
        )
        self.failures = Counter(
            "sepen_worker_job_failures", "failed jobs by kind and error code", ("kind", "code"), registry=registry
        )
        self.duration = Histogram(
            "sepen_worker_job_duration_seconds",
            "seconds from an attempt's claim to its final status, by kind and status",
            ("kind", "status"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.step = Histogram(
            "sepen_worker_finetune_step_seconds",
            "seconds per finetune step (from the job's progress: elapsed_s between steps, to 0.1 s)",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.cache_hits = Counter(
            "sepen_worker_cache_hits", "lookups that found the model or adapter loaded", ("cache",), registry=registry
        )
        self.cache_misses = Counter(
            "sepen_worker_cache_misses", "lookups that had to load the model or adapter", ("cache",), registry=registry
        )
        self.gpu_memory = Gauge(
            "sepen_worker_gpu_max_memory_allocated_bytes",
            "peak CUDA memory allocated by the last job of each kind (absent without a GPU)",
            ("kind",),
            registry=registry,
        )
        for kind in KINDS:  # every series from 0, so that rate() sees the first job
            for status in FINISHED:
                self.finished.labels(kind, status)
        for cache in CACHES:
            self.cache_hits.labels(cache)
            self.cache_misses.labels(cache)

    def watch(self, kind: str, reporter):
        """The reporter the job's progress goes through: for a finetune, one that also times its steps."""
        return StepTimer(reporter, self.step) if kind == "finetune" else reporter

    def job_finished(self, kind: str, outcome: Outcome, seconds: float) -> None:
        self.finished.labels(kind, outcome.status).inc()
        if outcome.status == "failed":
            self.failures.labels(kind, outcome.code or "internal_error").inc()
        self.duration.labels(kind, outcome.status).observe(seconds)
        stats = outcome.stats
        for cache in CACHES:
            self.cache_hits.labels(cache).inc(stats.get(f"{cache}_cache_hits", 0))
            self.cache_misses.labels(cache).inc(stats.get(f"{cache}_cache_misses", 0))
        if "gpu_max_memory_allocated_bytes" in stats:
            self.gpu_memory.labels(kind).set(stats["gpu_max_memory_allocated_bytes"])

    def serve(self, port: int, host: str) -> None:
        """Serve /metrics from a daemon thread; OSError when the port is taken."""
        start_http_server(port, addr=host, registry=self.registry)


class StepTimer:
    """Passes a finetune's progress on to its reporter and observes each step's time on the way: the difference
    of elapsed_s (seconds since this run or its resume began) between training reports; a run's first report times
    its first step. Reports of the phases without steps (loading, checking) are passed on untimed."""

    def __init__(self, reporter, histogram: Histogram):
        self.reporter = reporter
        self.histogram = histogram
        self.last: tuple[int, float] | None = None

    def progress(self, progress: dict, *, force: bool = False) -> None:
        step, elapsed = progress.get("step"), progress.get("elapsed_s")
        training = progress.get("phase", "training") == "training"
        if training and isinstance(step, int) and isinstance(elapsed, int | float):
            last_step, last_elapsed = self.last or (step - 1, 0.0)
            if step > last_step:
                seconds = max(0.0, elapsed - last_elapsed) / (step - last_step)
                for _ in range(step - last_step):
                    self.histogram.observe(seconds)
                self.last = (step, elapsed)
        self.reporter.progress(progress, force=force)

    def should_cancel(self) -> bool:
        return self.reporter.should_cancel()

    def __getattr__(self, name: str):
        return getattr(self.reporter, name)


class JobUsage:
    """In the job process: what one job cost, as Outcome.stats: model and adapter cache hits and misses, and the
    peak CUDA memory allocated while it ran (only when the work runs on a CUDA device)."""

    def __init__(self, work: Work):
        import torch

        self.work = work
        self.torch = torch
        self.device = torch.device(work.settings.device)
        self.before = self._counts()
        if self._cuda():
            torch.cuda.reset_peak_memory_stats(self.device)

    def _cuda(self) -> bool:
        return self.device.type == "cuda" and self.torch.cuda.is_initialized()

    def _counts(self) -> dict[str, int]:
        return {
            "model_cache_hits": self.work.models.hits,
            "model_cache_misses": self.work.models.misses,
            "adapter_cache_hits": self.work.adapters.hits,
            "adapter_cache_misses": self.work.adapters.misses,
        }

    def stats(self) -> dict[str, int]:
        stats = {name: count - self.before[name] for name, count in self._counts().items()}
        if self._cuda():  # CUDA first used in this job: its peak since then is this job's
            stats["gpu_max_memory_allocated_bytes"] = int(self.torch.cuda.max_memory_allocated(self.device))
        return stats
