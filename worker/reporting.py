"""A running job's link to its row: a heartbeat thread, throttled progress writes, and the cancel flag."""

from __future__ import annotations

import contextvars
import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from sepen_store.jobs import Claim, LostClaim, heartbeat

log = logging.getLogger(__name__)


class JobReporter:
    """Writes progress at most every `interval_s` and beats every `beat_s` from a thread, so a job stays
    claimed through long steps (model loading, a slow first step). should_cancel() reads the flag the
    last write returned: True once cancellation was requested, or once the claim was lost."""

    def __init__(self, sessions: sessionmaker[Session], claim: Claim, *, interval_s: float, beat_s: float):
        self.sessions = sessions
        self.claim = claim
        self.interval_s = interval_s
        self.beat_s = beat_s
        self.cancel_requested = False
        self.lost = False
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

    def _write(self, progress: dict | None) -> None:
        with self._lock, self.sessions() as session:
            try:
                self.cancel_requested = heartbeat(session, self.claim, progress) or self.cancel_requested
            except LostClaim:
                self.lost = True
            self._last_write = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._write(None)
            except Exception:  # the database may be briefly away; the next beat retries
                log.warning("heartbeat of job %s failed", self.claim.job_id, exc_info=True)

    def progress(self, progress: dict, *, force: bool = False) -> None:
        if force or time.monotonic() - self._last_write >= self.interval_s:
            self._write(progress)

    def should_cancel(self) -> bool:
        return self.cancel_requested or self.lost
