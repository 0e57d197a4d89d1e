"""A finetune's phases: `loading` with its elapsed time from the start of the work to the first step, a report per
training step, `checking` after the last step; each report fits the job contract, and the step timer times only the
training reports."""

import threading
import time

from sepen_core.prompts import ConceptSet
from sepen_store.contract import FinetuneProgress, parse_progress
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.jobs import create_job
from sepen_store.settings import WorkerSettings
from worker.metrics import WorkerMetrics
from worker.phases import FinetunePhases, PhaseTicker, planned_steps
from worker.work import Work


class Recorder:
    """A JobControl that keeps every report, and fails the test when two threads send at once."""

    def __init__(self, delay_s: float = 0.0):
        self.reports: list[tuple[dict, bool]] = []
        self.delay_s = delay_s
        self._sending = threading.Lock()

    def progress(self, progress: dict, *, force: bool = False) -> None:
        assert self._sending.acquire(blocking=False), "two reports sent at once"
        try:
            time.sleep(self.delay_s)
            self.reports.append((progress, force))
        finally:
            self._sending.release()

    def should_cancel(self) -> bool:
        return False


def test_a_ticker_reports_at_once_then_every_tick_and_nothing_after_stop():
    control = Recorder(delay_s=0.01)
    with PhaseTicker(control, lambda elapsed: {"phase": "loading", "elapsed_s": elapsed}, every_s=0.05) as ticker:
        time.sleep(0.3)
        ticker.stop()
        count = len(control.reports)
        time.sleep(0.15)
    assert len(control.reports) == count >= 3
    assert control.reports[0] == ({"phase": "loading", "elapsed_s": 0.0}, True)  # the phase change: forced
    assert not any(force for _, force in control.reports[1:])
    elapsed = [report["elapsed_s"] for report, _ in control.reports]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0


def test_phases_go_loading_training_checking_and_stop_with_the_block():
    control = Recorder()
    step = FinetuneProgress(step=1, total=2, eta_s=1.0, elapsed_s=0.5, losses={"total": 1, "separate": 1, "enhance": 0})
    with FinetunePhases(control, total=2) as phases:
        phases.step(step)
        phases.checking(step)
    count = len(control.reports)
    time.sleep(0.05)
    assert len(control.reports) == count
    progress = [parse_progress("finetune", report) for report, _ in control.reports]
    assert [p.phase for p in progress][0] == "loading" and progress[-1].phase == "checking"
    assert progress[0].step == 0 and progress[0].total == 2 and progress[0].losses is None
    assert progress[0].eta_s is None and progress[0].peaks == {}
    assert progress[-1].losses == step.losses and progress[-1].eta_s is None
    assert [p.phase for p in progress].count("training") == 1
    assert FinetunePhases(Recorder(), total=None).__enter__()._ticker is None  # no total known: no loading reports


def test_the_planned_steps_come_from_the_card_without_loading():
    assert planned_steps("toy", "groups", {}) == 150  # the bundled model's own pair recipe
    assert planned_steps("toy", "groups", {"steps": 30}) == 30
    assert planned_steps("tiny", "collection", {}) == 10_000  # the paper's large-scale recipe
    assert planned_steps(None, "groups", {}) is None
    assert planned_steps("/no/such/model", "groups", {}) is None


def test_a_finetune_reports_loading_before_its_first_step_and_checking_after_its_last(tmp_path):
    settings = WorkerSettings(data_dir=tmp_path)
    upgrade_database(settings.database_url)
    sessions = session_factory(make_engine(settings.database_url))
    request = {
        "adapter": "phases",
        "model": "sepen-tiny",
        "concepts": ConceptSet.pairs(("cat", "dog")).to_dict(),
        "recipe": {"steps": 3, "batch_size": 1, "check_samples": 0},
    }
    with sessions() as session:
        job, _ = create_job(session, "acme", "finetune", request)
    control = Recorder()
    Work.create(settings, sessions).finetune(job.id, False, control)
    progress = [FinetuneProgress.model_validate(report) for report, _ in control.reports]
    phases = [p.phase for p in progress]
    first_step = phases.index("training")
    assert phases[0] == "loading" and set(phases[:first_step]) == {"loading"}
    assert [p.step for p in progress if p.phase == "training"] == [1, 2, 3]
    assert phases[-1] == "checking" and set(phases[phases.index("checking") :]) == {"checking"}
    assert all(p.total == 3 for p in progress)


def test_the_step_timer_times_training_reports_only():
    metrics = WorkerMetrics()
    timer = metrics.watch("finetune", Recorder())
    timer.progress({"phase": "loading", "step": 0, "total": 3, "elapsed_s": 40.0})
    timer.progress({"phase": "training", "step": 1, "total": 3, "elapsed_s": 0.5})
    timer.progress({"phase": "checking", "step": 1, "total": 3, "elapsed_s": 30.0})
    assert metrics.registry.get_sample_value("sepen_worker_finetune_step_seconds_count") == 1
    assert metrics.registry.get_sample_value("sepen_worker_finetune_step_seconds_sum") == 0.5
