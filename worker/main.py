"""`sepen-worker`: one Celery worker process (solo pool) serving the finetune and/or generate queues, its job
process (worker/engine.py: the jobs' work, stoppable), the reconciler that re-sends jobs whose messages were lost,
the loop that delivers the jobs' webhooks (worker/webhooks.py), and the retention of old images and checkpoints. Its
job writes publish their events to Redis.

    sepen-worker                       # every queue
    sepen-worker --queues finetune     # a finetune-only GPU worker
"""

from __future__ import annotations

import argparse
import logging
import threading

from celery import Celery

from sepen_core.extras import version
from sepen_store.database import make_engine, session_factory
from sepen_store.events import publisher_for
from sepen_store.jobs import mark_not_enqueued, take_resends
from sepen_store.logs import configure_logging
from sepen_store.object_store import object_store_for
from sepen_store.queue import QUEUES, TASKS, enqueue, jobs_in_broker, make_celery
from sepen_store.retention import Removed, apply_retention
from sepen_store.settings import WorkerSettings
from worker.runner import Runtime
from worker.webhooks import start_delivery_loop

log = logging.getLogger("sepen.worker")


def register_tasks(app: Celery, runtime: Runtime) -> None:
    @app.task(name=TASKS["finetune"])
    def run_finetune(job_id: str) -> str | None:
        return runtime.run("finetune", job_id)

    @app.task(name=TASKS["generate"])
    def run_generate(job_id: str) -> str | None:
        return runtime.run("generate", job_id)

    @app.task(name=TASKS["evaluate"])
    def run_evaluate(job_id: str) -> str | None:
        return runtime.run("evaluate", job_id)


def reconcile_once(app: Celery, runtime: Runtime) -> int:
    """Re-send the messages that were really lost: of jobs queued for requeue_after_s whose message is neither in
    the broker nor recently taken by a worker, and of running jobs whose worker went silent. Each due job is
    taken by one reconciler per period, whichever worker it runs in. Returns how many messages it sent."""
    settings = runtime.settings
    with runtime.sessions() as session:
        taken = take_resends(session, requeue_after_s=settings.requeue_after_s, lease_s=settings.job_lease_s)
        sent = []
        try:
            waiting = set()
            if any(status == "queued" for _, _, status in taken):
                waiting = jobs_in_broker(app, taken_within_s=settings.requeue_after_s) or set()
            for job_id, kind, status in taken:
                if status == "queued" and job_id in waiting:
                    continue  # its message is still there: a busy worker, not a lost message
                enqueue(app, kind, job_id)
                sent.append(job_id)
        except Exception:
            for job_id, _, _ in taken:  # the broker is away: whichever reconciler comes next sends them
                if job_id not in sent:
                    mark_not_enqueued(session, job_id)
            raise
        finally:
            if sent:
                log.info("reconciler re-sent %d job(s): %s", len(sent), ", ".join(sent))
    return len(sent)


def start_reconciler(app: Celery, runtime: Runtime) -> threading.Thread:
    def loop() -> None:
        while True:
            try:
                reconcile_once(app, runtime)
            except Exception as exc:  # broker or database away: try again next round
                log.warning("reconciler round failed: %s", exc)
            stop.wait(runtime.settings.reconcile_interval_s)

    stop = threading.Event()
    thread = threading.Thread(target=loop, name="reconciler", daemon=True)
    thread.start()
    return thread


def retain_once(runtime: Runtime) -> Removed:
    """Delete the images and checkpoints past their retention (SEPEN_IMAGE_RETENTION_DAYS,
    SEPEN_CHECKPOINT_RETENTION_DAYS); every worker may run it, each deletion happens once."""
    settings = runtime.settings
    with runtime.sessions() as session:
        removed = apply_retention(
            session, image_days=settings.image_retention_days, checkpoint_days=settings.checkpoint_retention_days
        )
    if removed.images or removed.checkpoints:
        log.info("retention deleted %d image(s) and %d checkpoint(s)", removed.images, removed.checkpoints)
    return removed


def start_retention(runtime: Runtime) -> threading.Thread | None:
    """A thread applying retention every SEPEN_RETENTION_INTERVAL_S, from the worker's start; None when all is kept."""
    settings = runtime.settings
    if not settings.image_retention_days and not settings.checkpoint_retention_days:
        return None

    def loop() -> None:
        while True:
            try:
                retain_once(runtime)
            except Exception as exc:  # database or object store away: try again next round
                log.warning("retention round failed: %s", exc)
            stop.wait(settings.retention_interval_s)

    stop = threading.Event()
    thread = threading.Thread(target=loop, name="retention", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sepen-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--queues", default="finetune,generate,evaluate", help="comma-separated: finetune, generate, evaluate"
    )
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument(
        "--hostname",
        default="sepen@%h",
        help="Celery node name; give each worker on a host its own (default sepen@%%h)",
    )
    args = parser.parse_args(argv)
    settings = WorkerSettings.from_env()
    configure_logging(settings.log_format, args.loglevel, process="worker")
    kinds = [k.strip() for k in args.queues.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in QUEUES]
    if unknown or not kinds:
        parser.error(f"--queues must name some of {', '.join(QUEUES)}, not {unknown or kinds}")
    app = make_celery(settings)
    sessions = session_factory(
        make_engine(settings.database_url),
        events=publisher_for(settings.broker_url),
        blobs=object_store_for(settings),
    )
    runtime = Runtime.create(settings, sessions)
    if settings.worker_metrics_port:  # before the job process starts: a port already taken stops the worker here
        where = f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
        try:
            runtime.metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
        except OSError as exc:
            raise SystemExit(
                f"sepen-worker: cannot serve metrics at {where} ({exc}); give each worker on a host "
                "its own SEPEN_WORKER_METRICS_PORT"
            ) from None
        log.info("metrics at http://%s/metrics", where)
    runtime.jobs.start()  # the job process loads its imports while Celery connects
    register_tasks(app, runtime)
    start_reconciler(make_celery(settings, fail_fast=True), runtime)
    start_delivery_loop(sessions, settings)
    start_retention(runtime)
    worker_args = [
        *(["--quiet"] if settings.log_format == "json" else []),  # no banner: every line of a JSON log is JSON
        "worker",
        "--pool=solo",
        "--concurrency=1",
        f"--queues={','.join(QUEUES[k] for k in kinds)}",
        f"--loglevel={args.loglevel}",
        "--without-gossip",
        "--without-mingle",
        f"--hostname={args.hostname}",
    ]
    try:
        app.worker_main(worker_args)
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
