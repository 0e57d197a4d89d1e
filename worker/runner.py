"""Run a job: claim its row (and, for a generate job, the queued jobs that can share its batch), hand the work to
the job process, stop it on cancel or time limit, record how each job ended.

Every failure inside a job ends that job (failed, with the code its error class declares and its message)
and leaves the worker serving, as does an error of the worker's own side of the run (internal_error: a job left
running would be sent again and again); a job whose claim was taken over by another worker is dropped without
writing. While the database is unreachable the worker waits (holding the one message it took) instead of
failing the job or taking more messages.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import TypeVar

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from sepen_core.errors import SepenError
from sepen_core.model_card import model_card
from sepen_store.contract import GenerateRequest, parse_request, parse_result
from sepen_store.job_outputs import delete_checkpoint
from sepen_store.jobs import Claim, claim_companions, claim_job, finish_job, get_job
from sepen_store.logs import job_logging
from sepen_store.quotas import COMPUTE_QUOTA_EXCEEDED
from sepen_store.settings import WorkerSettings
from worker.engine import InProcess, JobProcess
from worker.metrics import WorkerMetrics
from worker.outages import through_outages
from worker.protocol import Outcome
from worker.reporting import JobReporter

log = logging.getLogger(__name__)
T = TypeVar("T")
_card = functools.lru_cache(maxsize=64)(model_card)  # a model's card, read once per worker


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
        return getattr(self.settings, f"{kind}_time_limit_s")

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
        claims = [claim, *self._companions(kind, claim, me)]
        if len(claims) > 1:
            log.info("job %s runs in one batch with %s", job_id, ", ".join(c.job_id for c in claims[1:]))
        beat = max(0.5, min(2.0, self.settings.job_lease_s / 4))
        with ExitStack() as stack:
            reporters = [
                stack.enter_context(
                    JobReporter(
                        self.sessions,
                        c,
                        interval_s=self.settings.progress_interval_s,
                        beat_s=beat,
                        compute_quota_s=self.settings.compute_seconds_per_day,
                    )
                )
                for c in claims
            ]
            watched = [self.metrics.watch(kind, r) for r in reporters]
            try:
                outcomes = self.jobs.run(kind, claims, watched, self.time_limit_s(kind))
            except Exception:  # a bug on the worker's side of the run: the jobs end failed, never left running
                log.exception("job %s (%s): its run failed on an error of the worker; failing it", job_id, kind)
                outcomes = [Outcome.internal_error()] * len(claims)
        statuses = []
        for c, reporter, outcome in zip(claims, reporters, outcomes, strict=True):
            if reporter.lost:
                log.warning("job %s was taken over by another worker; dropping this attempt", c.job_id)
                statuses.append(None)
            else:
                if outcome.status == "canceled" and reporter.over_quota and not reporter.cancel_requested:
                    outcome = replace(self._stopped_by_quota(kind), stats=outcome.stats)
                statuses.append(self._finish(kind, c, outcome, claimed_at, progress=reporter.unsaved))
        return statuses[0]

    def _companions(self, kind: str, claim: Claim, me: str) -> list[Claim]:
        """The queued generate jobs claimed to run in one batch with this one (SEPEN_GENERATE_BATCH_JOBS,
        SEPEN_GENERATE_BATCH_IMAGES): the same batch_signature, oldest first."""
        settings = self.settings
        if kind != "generate" or settings.generate_batch_jobs <= 1:
            return []

        def claim_them(session: Session) -> list[Claim]:
            first = parse_request(kind, get_job(session, None, claim.job_id).request)
            signature, images = self._batch_signature(first), [first.sample.get("num_images", 1)]
            if signature is None:
                return []

            def fits(stored: dict) -> bool:
                try:
                    request = parse_request(kind, stored)
                except ValidationError:
                    return False  # it fails on its own, in its own run
                count = request.sample.get("num_images", 1)
                if self._batch_signature(request) != signature or images[0] + count > settings.generate_batch_images:
                    return False
                images[0] += count
                return True

            return claim_companions(
                session,
                me,
                settings.job_lease_s,
                kind=kind,
                exclude=claim.job_id,
                limit=settings.generate_batch_jobs - 1,
                fits=fits,
            )

        companions = self.with_database(claim_them)
        for companion in [c for c in companions if c.cancel_requested]:
            self._finish(kind, companion, Outcome("canceled"), time.monotonic())
        return [c for c in companions if not c.cancel_requested]

    def _batch_signature(self, request: GenerateRequest) -> tuple | None:
        """Equal for generate requests that can share a UNet batch (from the model's card, without loading it);
        None for a request that runs alone (an unknown model, settings no SampleConfig takes, Attend-and-Excite)."""
        source = self.settings.models.get(request.model)
        if source is None:
            return None
        try:
            signature = _card(source).batch_signature(request.sample, bool(request.concepts))
        except SepenError:
            return None
        return None if signature is None else (request.model, signature)

    def _stopped_by_quota(self, kind: str) -> Outcome:
        """How a job ends that was stopped because its tenant crossed the daily compute budget."""
        message = (
            f"stopped: your jobs have run the {self.settings.compute_seconds_per_day} compute seconds of today's "
            "budget (SEPEN_COMPUTE_SECONDS_PER_DAY), which renews at midnight UTC"
        )
        if kind == "finetune":
            message += "; its checkpoint is kept, and the same finetune request, sent again, resumes from it"
        return Outcome("failed", code=COMPUTE_QUOTA_EXCEEDED, message=message)

    def _finish(
        self, kind: str, claim: Claim, outcome: Outcome, claimed_at: float, *, progress: dict | None = None
    ) -> str | None:
        """Record how the job ended (with `progress`, its last report if that was not stored yet), unless the claim
        was lost; waits out a database outage. An end the database does not take for another reason is recorded
        without that report, and failing that as an internal error: a job is never left running (it would be sent
        again and again). A finished finetune's checkpoint is deleted; failing that is logged (retention deletes it)."""
        outcome = result_checked(kind, claim, outcome)
        fallbacks = [(outcome, None)] if progress is not None else []
        fallbacks.append((replace(Outcome.internal_error(), stats=outcome.stats), None))
        while True:
            try:
                record = functools.partial(_record, claim=claim, outcome=outcome, progress=progress)
                finished = self.with_database(record)
                break
            except Exception:
                if not fallbacks:
                    raise
                log.exception("job %s: its end (%s) could not be recorded", claim.job_id, outcome.status)
                outcome, progress = fallbacks.pop(0)
        if not finished:
            return None
        if kind == "finetune" and outcome.code != COMPUTE_QUOTA_EXCEEDED:
            try:
                self.with_database(lambda session: delete_checkpoint(session, claim.job_id))
            except Exception:
                log.warning("job %s: its checkpoint was not deleted; retention will", claim.job_id, exc_info=True)
        seconds = time.monotonic() - claimed_at
        log.info("job %s %s after %.1f s", claim.job_id, outcome.status, seconds)
        self.metrics.job_finished(kind, outcome, seconds)
        return outcome.status

    def with_database(self, step: Callable[[Session], T]) -> T:
        """Run a database step, waiting (with back-off) through an outage however long, instead of failing the job."""

        def attempt() -> T:
            with self.sessions() as session:
                return step(session)

        return through_outages(attempt, dependencies=("database",))

    def close(self) -> None:
        self.jobs.close()


def _record(session: Session, claim: Claim, outcome: Outcome, progress: dict | None) -> bool:
    return finish_job(
        session,
        claim,
        outcome.status,
        result=outcome.result,
        error_code=outcome.code,
        error_message=outcome.message,
        progress=progress,
    )


def result_checked(kind: str, claim: Claim, outcome: Outcome) -> Outcome:
    """The outcome, if it did not succeed or its result fits its kind's result model; else an internal error (a result
    of the wrong shape is a bug, and storing it would hand a client what is not its job's answer)."""
    if outcome.status != "succeeded":
        return outcome
    try:
        parse_result(kind, outcome.result)
    except ValidationError as exc:
        log.error("job %s ended with a result that is not a %s result; failing it: %s", claim.job_id, kind, exc)
        return replace(Outcome.internal_error(), stats=outcome.stats)
    return outcome
