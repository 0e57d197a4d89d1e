"""A finetune's phases without steps of their own, loading (the model, the probes, the training latents) and checking
(the probes again and the do-no-harm check), reported with their elapsed time from a thread while the work blocks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sepen_core.errors import SepenError
from sepen_core.model_card import model_card
from sepen_store.contract import FinetuneProgress

log = logging.getLogger(__name__)
TICK_S = 1.0  # how often a phase's elapsed time is reported (the reporter still writes at most every interval)


class Reports(Protocol):
    def progress(self, progress: dict, *, force: bool = False) -> None: ...


class PhaseTicker:
    """While the `with` block runs: `report(elapsed_s)` goes to `control` at once (forced: a phase change is news),
    then every `every_s` from a daemon thread. stop() ends the reports before the work sends its own: one report at a
    time goes through the control (a job process's pipe takes one sender at a time)."""

    def __init__(self, control: Reports, report: Callable[[float], dict[str, Any]], every_s: float = TICK_S):
        self.control = control
        self.report = report
        self.every_s = every_s
        self.began = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._tick, name="phase-ticker", daemon=True)

    def __enter__(self) -> PhaseTicker:
        self.began = time.monotonic()
        self._send(force=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def elapsed(self) -> float:
        return round(time.monotonic() - self.began, 1)

    def stop(self) -> None:
        """No report after this returns (idempotent)."""
        with self._lock:
            self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _send(self, *, force: bool) -> None:
        with self._lock:
            if not self._stop.is_set():
                self.control.progress(self.report(self.elapsed()), force=force)

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._send(force=False)
            except Exception:  # noqa: BLE001 - a lost report of elapsed time must not end the job's work
                log.warning("a phase report could not be sent; no more of them this phase", exc_info=True)
                return


class FinetunePhases:
    """A finetune's reports through its phases: `loading` from the `with` on (when its step count is known), each
    training step's report as the work sends it (step()), `checking` from checking() until the `with` ends."""

    def __init__(self, control: Reports, total: int | None):
        self.control = control
        self.total = total
        self._ticker: PhaseTicker | None = None

    def __enter__(self) -> FinetunePhases:
        if self.total is not None:
            total = self.total
            self._start(lambda elapsed: FinetuneProgress(phase="loading", step=0, total=total, elapsed_s=elapsed))
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def step(self, progress: FinetuneProgress, *, force: bool = False) -> None:
        """A training step's report: the loading reports end before it."""
        self._stop()
        self.control.progress(progress.model_dump(), force=force)

    def checking(self, last: FinetuneProgress) -> None:
        """Training is over: `checking` reports with the last step's numbers until the `with` ends."""
        self._stop()
        self._start(lambda elapsed: last.model_copy(update={"phase": "checking", "elapsed_s": elapsed, "eta_s": None}))

    def _start(self, report: Callable[[float], FinetuneProgress]) -> None:
        self._ticker = PhaseTicker(self.control, lambda elapsed: report(elapsed).model_dump()).__enter__()

    def _stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None


def planned_steps(source: str | None, mode: str, recipe: dict[str, Any]) -> int | None:
    """The steps a finetune of model `source` will train, from its card (no loading); None where it cannot say (an
    unknown model, a recipe it refuses: the work fails on those itself)."""
    if source is None:
        return None
    try:
        return model_card(source).defaults.finetune_config(mode, recipe).steps
    except SepenError:
        return None
