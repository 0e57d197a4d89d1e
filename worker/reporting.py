"""A running job's link to its row: a heartbeat thread, throttled progress writes, the cancel flag and its tenant's
daily compute budget; progress is kept in memory while the database is unreachable and written when it is back, and
dropped (logged) when it cannot be stored for another reason."""

from __future__ import annotations

import contextvars
import logging
import math
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
    stores it. The runner stores whatever is still unsaved with the job's final status. A progress report's
    non-finite numbers (NaN, infinities: no JSON has them) are stored as null; a write that fails for another
    reason than an outage drops the progress it carried (logged: trying it again would fail again, beat after beat,
    until the claim's lease lapsed) and raises nothing."""

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
        self._lock = threading.Lock()  # guards `unsaved`, which the job's loop sets while the heartbeat thread writes
        self._writing = threading.Lock()  # one write at a time
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
        """Beat, with the unsaved progress if any; an outage leaves it unsaved for the next try, another error drops
        it (and raises, for a beat without progress)."""
        with self._writing:
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
                    if progress is None:
                        raise
                    self._saved(progress)
                    log.error(
                        "job %s: its progress report %r could not be stored; dropped it",
                        self.claim.job_id,
                        progress,
                        exc_info=exc,
                    )
                    return
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning(
                        "job %s: database unreachable; its progress waits in memory (%s)", self.claim.job_id, exc
                    )
                return
            if self.down_since is not None:
                log.info("job %s: database back after %.0f s", self.claim.job_id, time.monotonic() - self.down_since)
                self.down_since = None
            self._saved(progress)
            self._last_write = time.monotonic()

    def _saved(self, progress: dict | None) -> None:
        """`progress` is written (or dropped): no longer unsaved, unless a newer report came meanwhile."""
        with self._lock:
            if self.unsaved is progress:
                self.unsaved = None

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
        with self._lock:
            self.unsaved = finite(progress)
        if self.down_since is not None:
            return  # the heartbeat thread is trying already; the caller (the job's loop) must not wait on it
        if force or time.monotonic() - self._last_write >= self.interval_s:
            self._write()

    def should_cancel(self) -> bool:
        return self.cancel_requested or self.lost or self.over_quota


def finite(value):
    """`value` with every NaN and infinity in it (at any depth of dicts and lists) as None: what JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value
