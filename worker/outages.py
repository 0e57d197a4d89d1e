"""Riding out an outage of the database or the object store: a step that meets one is tried again, with back-off.

The worker's own steps (claiming a job, finishing it) wait for as long as the outage lasts: the worker holds the
job's outcome and takes no other message meanwhile. A step of a job's work waits up to SEPEN_OUTAGE_GRACE_S; past
that the job fails with `database_unavailable` or `storage_unavailable` and a message written for its user. The
driver's own text, which names hosts, ports, endpoints and buckets, goes only to the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import TypeVar

from sepen_store.availability import outage_of

log = logging.getLogger(__name__)
T = TypeVar("T")
FIRST_WAIT_S = 0.5
LONGEST_WAIT_S = 10.0
WHAT_IS_DOWN = {"database": "database", "storage": "object store", "broker": "message broker"}


class OutageTooLong(Exception):
    """A dependency stayed unreachable for longer than a job may wait (SEPEN_OUTAGE_GRACE_S)."""

    def __init__(self, dependency: str, waited_s: float, grace_s: float):
        super().__init__(
            f"the service's {WHAT_IS_DOWN[dependency]} did not answer for {waited_s:.0f} s, longer than a job waits "
            f"for it (SEPEN_OUTAGE_GRACE_S, {grace_s:g} s); submit the job again"
        )
        self.code = f"{dependency}_unavailable"


def through_outages(
    step: Callable[[], T],
    *,
    grace_s: float | None = None,
    dependencies: Collection[str] = ("database", "storage"),
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """step(), tried again after 0.5, 1, 2, ... (at most 10) seconds for as long as it fails because one of
    `dependencies` is unreachable: for ever, or until grace_s have passed (then OutageTooLong). Any other error is
    raised at once."""
    started = time.monotonic()
    wait = FIRST_WAIT_S
    while True:
        try:
            return step()
        except Exception as exc:
            dependency = outage_of(exc)
            if dependency not in dependencies:
                raise
            waited = time.monotonic() - started
            if grace_s is not None and waited >= grace_s:
                log.warning(
                    "%s unreachable for %.0f s; giving up (%s: %s)", dependency, waited, type(exc).__name__, exc
                )
                raise OutageTooLong(dependency, waited, grace_s) from exc
            if grace_s is not None:
                wait = min(wait, max(grace_s - waited, 0.0))  # one last try when the grace ends
            log.warning("%s unreachable; retrying in %.1f s: %s", dependency, wait, exc)
            sleep(wait)
            wait = min(wait * 2, LONGEST_WAIT_S)
