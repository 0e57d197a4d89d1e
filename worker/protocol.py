"""The messages between a worker (worker/engine.JobProcess) and its job process, each naming the batch it is about.

    worker -> job process   RunBatch(batch_id, kind, jobs)
    job process -> worker   Started(batch_id), then Progress(batch_id, job_id, ...) as the work goes, then
                            Done(batch_id, outcomes), one Outcome per job in the order of RunBatch.jobs

A batch id is new for every RunBatch, so a message left in the pipe by a batch the worker gave up on (its process
is stopped then, but a message may already be on its way) is recognised and dropped, never read as another
batch's progress or result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INTERNAL_ERROR = "internal_error"
INTERNAL_ERROR_MESSAGE = "the job stopped on an internal error of the service; the worker's log has it under its id"


@dataclass(frozen=True)
class Outcome:
    """How a job's work ended: succeeded with its result, canceled, or failed with an error code and message;
    stats: what the work cost, for the worker's metrics (worker.metrics.JobUsage; empty when the process was
    stopped)."""

    status: str
    result: dict | None = None
    code: str | None = None
    message: str | None = None
    stats: dict[str, int] = field(default_factory=dict)

    @classmethod
    def internal_error(cls) -> Outcome:
        """Failed by a bug of the service: the user reads only that; the log has the error."""
        return cls("failed", code=INTERNAL_ERROR, message=INTERNAL_ERROR_MESSAGE)


@dataclass(frozen=True)
class JobToRun:
    """One job of a batch: its id, and whether an earlier attempt ran (a finetune then looks for its checkpoint)."""

    job_id: str
    resumed: bool


@dataclass(frozen=True)
class RunBatch:
    """Run these jobs of one kind (several only for generate jobs) and report on them under batch_id."""

    batch_id: str
    kind: str
    jobs: tuple[JobToRun, ...]


@dataclass(frozen=True)
class Started:
    """The job process took the batch: its imports are loaded, the batch's time limit starts now."""

    batch_id: str


@dataclass(frozen=True)
class Progress:
    """A progress report of one job of the batch; force: store it now, whatever the throttle."""

    batch_id: str
    job_id: str
    progress: dict
    force: bool = False


@dataclass(frozen=True)
class Done:
    """The batch ended: each job's Outcome, in the order of the batch's jobs."""

    batch_id: str
    job_ids: tuple[str, ...]
    outcomes: tuple[Outcome, ...]


Report = Started | Progress | Done  # what the job process sends
