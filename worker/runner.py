"""Run one job: claim its row, hand its work to the job process, stop it on cancel or time limit, record how it ended.

Every failure inside a job ends that job (failed, with the code its error class declares and its message)
and leaves the worker serving; a job whose claim was taken over by another worker is dropped without
writing. While the database is unreachable the worker waits (holding the one message it took) instead of
failing the job or taking more messages.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from sepen_store.availability import outage_of
from sepen_store.job_outputs import delete_checkpoint
from sepen_store.jobs import Claim, claim_job, finish_job
from sepen_store.logs import job_logging
from sepen_store.settings import WorkerSettings
from worker.engine import InProcess, JobProcess, Outcome
from worker.metrics import WorkerMetrics
from worker.reporting import JobReporter

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Runtime:
    """What a worker process keeps between jobs: settings, database sessions, where job work runs, its metrics."""

    settings: WorkerSettings
    sessions: sessionmaker[Session]
    jobs: JobProcess | InProcess
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)

    @classmethod
    def create(cls, settings: WorkerSettings, sessions: sessionmaker[Session], *, in_process: bool = False) -> Runtime:
        """in_process: run the work in this process (tests of the work); otherwise in a stoppable child."""
        if in_process:
            from worker.work import Work

            return cls(settings, sessions, InProcess(Work.create(settings, sessions)))
        return cls(settings, sessions, JobProcess(settings))

    def time_limit_s(self, kind: str) -> float:
        return self.settings.finetune_time_limit_s if kind == "finetune" else self.settings.generate_time_limit_s

    def run(self, kind: str, job_id: str) -> str | None:
        """Claim and run a job; returns its final status, or None if it was not ours to run."""
        with job_logging(job_id):  # every line logged while it runs carries its id
            return self._run(kind, job_id)

    def _run(self, kind: str, job_id: str) -> str | None:
        me = f"{self.worker_id}:{uuid.uuid4().hex[:6]}"
        claim = self.with_database(lambda s: claim_job(s, job_id, me, self.settings.job_lease_s))
        if claim is None:
            log.info("job %s is not claimable (already taken or finished); message dropped", job_id)
            return None
        claimed_at = time.monotonic()
        log.info("job %s (%s) claimed, attempt %d", job_id, kind, claim.attempt)
        if claim.cancel_requested:  # canceled while an earlier attempt ran, and that worker died
            return self._finish(kind, claim, Outcome("canceled"), claimed_at)
        beat = max(0.5, min(2.0, self.settings.job_lease_s / 4))
        with JobReporter(self.sessions, claim, interval_s=self.settings.progress_interval_s, beat_s=beat) as reporter:
            outcome = self.jobs.run(kind, claim, self.metrics.watch(kind, reporter), self.time_limit_s(kind))
        if reporter.lost:
            log.warning("job %s was taken over by another worker; dropping this attempt", job_id)
            return None
        return self._finish(kind, claim, outcome, claimed_at)

    def _finish(self, kind: str, claim: Claim, outcome: Outcome, claimed_at: float) -> str | None:
        def record(session: Session) -> bool:
            finished = finish_job(
                session,
                claim,
                outcome.status,
                result=outcome.result,
                error_code=outcome.code,
                error_message=outcome.message,
            )
            if finished and kind == "finetune":
                delete_checkpoint(session, claim.job_id)
            return finished

        if not self.with_database(record):
            return None
        seconds = time.monotonic() - claimed_at
        log.info("job %s %s after %.1f s", claim.job_id, outcome.status, seconds)
        self.metrics.job_finished(kind, outcome, seconds)
        return outcome.status

    def with_database(self, step: Callable[[Session], T]) -> T:
        """Run a database step, waiting (with back-off) through an outage instead of failing the job."""
        delay = 0.5
        while True:
            try:
                with self.sessions() as session:
                    return step(session)
            except Exception as exc:
                if outage_of(exc) != "database":
                    raise
                log.warning("database unreachable; retrying in %.0f s (%s)", delay, type(exc).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def close(self) -> None:
        self.jobs.close()
