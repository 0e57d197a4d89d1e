"""Where a job's work runs: in a child process of the worker (JobProcess), which the worker can stop at any
moment, even inside one long step, to honour a cancel or a time limit; a fresh child then takes its place.
InProcess runs the same work in the worker itself (tests of the work; no hard stop).

The child keeps the models and adapters it loaded between jobs, talks with the worker through a pipe in the typed
messages of worker/protocol.py (each names its batch; one of another batch is dropped), reads each job's cancel flag
from shared memory, and exits on its own when the worker dies. The worker never leaves a batch with the child still
at work on it: whatever stops the worker's side of a batch stops the child too.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from sepen_store.jobs import Claim
from sepen_store.logs import configure_logging, job_logging
from sepen_store.settings import WorkerSettings
from worker.protocol import Done, JobToRun, Outcome, Progress, Report, RunBatch, Started
from worker.reporting import JobReporter

if TYPE_CHECKING:
    from worker.work import Work

log = logging.getLogger(__name__)
POLL_S = 0.2


def run_work(work: Work, kind: str, job_id: str, resumed: bool, control) -> Outcome:
    """Run the work and turn whatever happened into an Outcome (every failure has its error code), with its stats."""
    from worker.metrics import JobUsage

    usage = JobUsage(work)
    try:
        outcome = _succeeded(work.run(kind, job_id, resumed, control))
    except Exception as exc:  # noqa: BLE001 - any crash ends this job, not the worker
        outcome = _ended_by(exc, job_id)
    return replace(outcome, stats=usage.stats())


def run_jobs(work: Work, kind: str, jobs: Sequence[JobToRun], controls: list) -> list[Outcome]:
    """Run one job (with its control), or several generate jobs as a batch: one Outcome per job. A batch's usage
    (cache hits, GPU memory) is counted on its first job."""
    from worker.metrics import JobUsage

    if len(jobs) == 1:
        (job,), (control,) = jobs, controls
        return [run_work(work, kind, job.job_id, job.resumed, control)]
    usage = JobUsage(work)
    try:
        ended = work.run_batch(kind, [job.job_id for job in jobs], controls)
    except Exception as exc:  # noqa: BLE001 - the whole batch failed
        ended = [exc] * len(jobs)
    outcomes = [
        _ended_by(result, job.job_id) if isinstance(result, BaseException) else _succeeded(result)
        for job, result in zip(jobs, ended, strict=True)
    ]
    outcomes[0] = replace(outcomes[0], stats=usage.stats())
    return outcomes


def _succeeded(result) -> Outcome:
    return Outcome("succeeded", result.model_dump())


def _ended_by(exc: BaseException, job_id: str) -> Outcome:
    import torch

    from sepen_core.errors import Canceled
    from worker.work import failure_of

    if isinstance(exc, Canceled):
        return Outcome("canceled")
    failure = failure_of(exc)
    # The log has what the user's message leaves out: the error itself (a driver's hosts and ports), a bug's traceback.
    log.warning(
        "job %s failed (%s): %s", job_id, failure.code, exc, exc_info=exc if failure.code == "internal_error" else None
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return Outcome("failed", code=failure.code, message=str(failure))


class InProcess:
    """The work in the worker's own process: cancel only between steps, no time limit."""

    def __init__(self, work: Work):
        self.work = work

    def run(self, kind: str, claims: list[Claim], reporters: list[JobReporter], time_limit_s: float) -> list[Outcome]:
        return run_jobs(self.work, kind, [JobToRun(c.job_id, c.resumed) for c in claims], reporters)

    def close(self) -> None:
        pass


class JobProcess:
    """One child process that runs jobs (or batches of generate jobs) one after another; stopped (and later
    replaced) when a job must end now."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self._process: multiprocessing.Process | None = None
        self._conn = None
        self._cancel = None  # one flag per job of the batch running

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the child if none is alive (the worker calls this at startup so the first job needn't wait)."""
        if self._process is not None and self._process.is_alive():
            return
        context = multiprocessing.get_context("spawn")  # CUDA does not survive fork
        self._conn, child_conn = context.Pipe()
        self._cancel = context.Array("b", max(1, self.settings.generate_batch_jobs), lock=False)
        self._process = context.Process(
            target=serve,
            args=(self.settings.model_dump(), child_conn, self._cancel, os.getpid(), logging.getLogger().level),
            name="sepen-job",
            daemon=True,
        )
        self._process.start()
        child_conn.close()

    def close(self) -> None:
        """Stop the child now (what a job had not stored is lost; a finetune resumes from its checkpoint)."""
        if self._process is not None:
            self._process.kill()
            self._process.join(10)
            self._conn.close()
        self._process = self._conn = self._cancel = None

    def run(self, kind: str, claims: list[Claim], reporters: list[JobReporter], time_limit_s: float) -> list[Outcome]:
        """Hand the jobs to the child as one batch and wait for their outcomes, passing their progress on. A canceled
        job's flag tells the child; the child is stopped when every job of the batch is canceled and has not stopped
        within cancel_grace_s, or when the batch runs past time_limit_s. Whatever else ends this call (an error, an
        interrupt) stops the child first, so that no later batch meets this one's messages."""
        self.start()
        batch = RunBatch(uuid.uuid4().hex, kind, tuple(JobToRun(c.job_id, c.resumed) for c in claims))
        try:
            return self._run(batch, reporters, time_limit_s)
        except BaseException:
            log.warning("batch %s (%s) ended on an error in the worker; stopping its job process", batch.batch_id, kind)
            self.close()
            raise

    def _run(self, batch: RunBatch, reporters: list[JobReporter], time_limit_s: float) -> list[Outcome]:
        cancel = self._cancel
        for i in range(len(cancel)):
            cancel[i] = 0
        reporter_of = {job.job_id: reporter for job, reporter in zip(batch.jobs, reporters, strict=True)}
        self._conn.send(batch)
        deadline = None  # counted from the child's Started: a fresh child's imports are not the job's time
        canceled_at: dict[int, float] = {}
        while True:
            match self._receive(batch):
                case Done(job_ids=job_ids, outcomes=outcomes):
                    if job_ids != tuple(job.job_id for job in batch.jobs):
                        raise ProtocolError(f"batch {batch.batch_id} ended with the outcomes of jobs {job_ids}")
                    return list(outcomes)
                case Started():
                    deadline = time.monotonic() + time_limit_s
                case Progress(job_id=job_id, progress=progress, force=force):
                    reporter_of[job_id].progress(progress, force=force)
            if not self._process.is_alive():
                return [self._crashed()] * len(batch.jobs)
            now = time.monotonic()
            for i, reporter in enumerate(reporters):
                if i not in canceled_at and reporter.should_cancel():
                    cancel[i] = 1
                    canceled_at[i] = now
            if len(canceled_at) == len(batch.jobs) and now - max(canceled_at.values()) > self.settings.cancel_grace_s:
                log.warning(
                    "job %s did not stop within %.0f s of its cancel; stopping its process",
                    ", ".join(job.job_id for job in batch.jobs),
                    self.settings.cancel_grace_s,
                )
                self.close()
                return [Outcome("canceled")] * len(batch.jobs)
            if deadline is not None and now > deadline:
                self.close()
                return [
                    Outcome(
                        "failed",
                        code="time_limit_exceeded",
                        message=f"the {batch.kind} job ran longer than its time limit of {time_limit_s:g} s "
                        f"(SEPEN_{batch.kind.upper()}_TIME_LIMIT_S) and was stopped",
                    )
                ] * len(batch.jobs)

    def _receive(self, batch: RunBatch) -> Report | None:
        """The child's next message about `batch` within POLL_S, or None; a message about another batch is dropped."""
        try:
            message = self._conn.recv() if self._conn.poll(POLL_S) else None
        except (EOFError, OSError):
            return None
        if message is not None and message.batch_id != batch.batch_id:
            log.warning(
                "dropped a %s message of batch %s while running batch %s",
                type(message).__name__,
                message.batch_id,
                batch.batch_id,
            )
            return None
        return message

    def _crashed(self) -> Outcome:
        code = self._process.exitcode
        self.close()
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        hint = " (the machine may have run out of memory)" if code == -signal.SIGKILL else ""
        return Outcome("failed", code="worker_crashed", message=f"the process running the job {how}{hint}")


class ProtocolError(RuntimeError):
    """The job process answered a batch with something that does not fit it (a bug, never an outage)."""


class PipeControl:
    """The child's JobControl for the index-th job of a batch: progress goes to the worker through the pipe, under
    the batch's and the job's ids; cancel comes from the job's flag."""

    def __init__(self, conn, cancel, index: int, batch_id: str, job_id: str):
        self.conn = conn
        self.cancel = cancel
        self.index = index
        self.batch_id = batch_id
        self.job_id = job_id

    def progress(self, progress: dict, *, force: bool = False) -> None:
        self.conn.send(Progress(self.batch_id, self.job_id, progress, force))

    def should_cancel(self) -> bool:
        return bool(self.cancel[self.index])


def serve(settings: dict, conn, cancel, parent_pid: int, loglevel: int) -> None:
    """The child's loop: take a job (or a batch) from the pipe, run it, send its Outcomes; exit when the worker is
    gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the worker's to handle
    worker_settings = WorkerSettings(**settings)
    configure_logging(worker_settings.log_format, loglevel, process="job process")
    threading.Thread(target=_exit_with, args=(parent_pid,), name="parent-watch", daemon=True).start()

    _quiet_libraries()
    from sepen_store.database import make_engine, session_factory
    from sepen_store.object_store import object_store_for
    from worker.work import Work

    sessions = session_factory(make_engine(worker_settings.database_url), blobs=object_store_for(worker_settings))
    work = Work.create(worker_settings, sessions)
    while True:
        try:
            batch: RunBatch = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(Started(batch.batch_id))
        controls = [PipeControl(conn, cancel, i, batch.batch_id, job.job_id) for i, job in enumerate(batch.jobs)]
        with job_logging(batch.jobs[0].job_id):
            outcomes = run_jobs(work, batch.kind, batch.jobs, controls)
        try:
            conn.send(Done(batch.batch_id, tuple(job.job_id for job in batch.jobs), tuple(outcomes)))
        except OSError:
            return


def _exit_with(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _quiet_libraries() -> None:
    """No progress bars or advice from diffusers and transformers in a service's logs; their errors still show, through
    the root logger's handler (in SEPEN_LOG_FORMAT) instead of their own."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
        library.disable_default_handler()
        library.enable_propagation()
