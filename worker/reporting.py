"""A running job's link to its row: a heartbeat thread, throttled progress writes, the cancel flag and its tenant's
daily compute budget; progress is kept in memory while the database is unreachable and written when it is back."""

from __future__ import annotations

import contextvars
import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from sepen_store.availability import outage_of
from sepen_store.jobs import Claim, LostClaim, heartbeat
from sepen_store.quotas import QUOTA_CHECK_S, over_compute_quota
from worker.outages import FIRST_WAIT_S

log = logging.getLogger(__name__)


class JobReporter:
    """Writes progress at most every `interval_s` and beats every `beat_s` from a thread, so a job stays
    claimed through long steps (model loading, a slow first step). should_cancel() reads the flag the
    last write returned: True once cancellation was requested, once the claim was lost, or once the tenant's jobs
    have run `compute_quota_s` seconds today (checked every QUOTA_CHECK_S; 0: no budget), when `over_quota` is set.

    While the database is unreachable no call raises: the newest progress waits in `unsaved` and the heartbeat
    thread tries again, after 0.5 s, then twice as long each time up to `beat_s`; the first write that gets through
    stores it. The runner stores whatever is still unsaved with the job's final status."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        claim: Claim,
        *,
        interval_s: float,
        beat_s: float,
        compute_quota_s: int = 0,
    ):
        self.sessions = sessions
        self.claim = claim
        self.interval_s = interval_s
        self.beat_s = beat_s
        self.compute_quota_s = compute_quota_s
        self.cancel_requested = False
        self.lost = False
        self.over_quota = False
        self._quota_checked = float("-inf")
        self.unsaved: dict | None = None  # the newest progress not yet in the row
        self.down_since: float | None = None  # when a write first met the outage going on now
        self._last_write = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # In a copy of the creator's context, so that the heartbeat's log lines carry the job id (sepen_store.logs).
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._beat,), name=f"heartbeat-{claim.job_id[:8]}", daemon=True
        )

    def __enter__(self) -> JobReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _write(self) -> None:
        """Beat, with the unsaved progress if any; an outage leaves it unsaved for the next try."""
        with self._lock:
            progress = self.unsaved
            try:
                with self.sessions() as session:
                    self.cancel_requested = heartbeat(session, self.claim, progress) or self.cancel_requested
                    self._check_quota(session)
            except LostClaim:
                self.lost = True
            except Exception as exc:
                if outage_of(exc) != "database":
                    raise
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning(
                        "job %s: database unreachable; its progress waits in memory (%s)", self.claim.job_id, exc
                    )
                return
            if self.down_since is not None:
                log.info("job %s: database back after %.0f s", self.claim.job_id, time.monotonic() - self.down_since)
                self.down_since = None
            if self.unsaved is progress:  # nothing newer came while it was written
                self.unsaved = None
            self._last_write = time.monotonic()

    def _check_quota(self, session: Session) -> None:
        if self.compute_quota_s and time.monotonic() - self._quota_checked >= QUOTA_CHECK_S:
            self._quota_checked = time.monotonic()
            if over_compute_quota(session, self.claim.tenant, self.compute_quota_s) and not self.over_quota:
                log.warning("job %s: its tenant is over the daily compute budget; stopping it", self.claim.job_id)
                self.over_quota = True

    def _beat(self) -> None:
        wait = self.beat_s
        while not self._stop.wait(wait):
            was_up = self.down_since is None
            try:
                self._write()
            except Exception:  # not an outage: log it, the next beat tries again
                log.warning("heartbeat of job %s failed", self.claim.job_id, exc_info=True)
            if self.down_since is None:
                wait = self.beat_s
            else:  # back-off while the database is away, never longer than a beat (the claim's lease counts)
                wait = min(self.beat_s, FIRST_WAIT_S if was_up else wait * 2)

    def progress(self, progress: dict, *, force: bool = False) -> None:
        self.unsaved = progress
        if self.down_since is not None:
            return  # the heartbeat thread is trying already; the caller (the job's loop) must not wait on it
        if force or time.monotonic() - self._last_write >= self.interval_s:
            self._write()

    def should_cancel(self) -> bool:
        return self.cancel_requested or self.lost or self.over_quota
