"""`sepen-worker`: one Celery worker process (solo pool: CUDA does not survive fork) serving the
finetune and/or generate queues, plus the reconciler that re-sends jobs whose messages were lost.

    sepen-worker                       # both queues
    sepen-worker --queues finetune     # a finetune-only GPU worker
"""

from __future__ import annotations

import argparse
import logging
import threading

from celery import Celery

from sepen_store.database import make_engine, session_factory
from sepen_store.jobs import jobs_to_reenqueue, mark_enqueued
from sepen_store.queue import QUEUES, TASKS, enqueue, make_celery
from sepen_store.settings import WorkerSettings
from worker.runner import Runtime

log = logging.getLogger("sepen.worker")


def register_tasks(app: Celery, runtime: Runtime) -> None:
    @app.task(name=TASKS["finetune"])
    def run_finetune(job_id: str) -> str | None:
        return runtime.run("finetune", job_id)

    @app.task(name=TASKS["generate"])
    def run_generate(job_id: str) -> str | None:
        return runtime.run("generate", job_id)


def reconcile_once(app: Celery, runtime: Runtime) -> int:
    """Re-send the message of every job that waited too long in 'queued' or whose worker went silent."""
    settings = runtime.settings
    with runtime.sessions() as session:
        stuck = jobs_to_reenqueue(session, requeue_after_s=settings.requeue_after_s, lease_s=settings.job_lease_s)
        for job_id, kind in stuck:
            enqueue(app, kind, job_id)
            mark_enqueued(session, job_id)
    if stuck:
        log.info("reconciler re-sent %d job(s): %s", len(stuck), ", ".join(j for j, _ in stuck))
    return len(stuck)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sepen-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--queues", default="finetune,generate", help="comma-separated: finetune, generate")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument(
        "--hostname",
        default="sepen@%h",
        help="Celery node name; give each worker on a host its own (default sepen@%%h)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = WorkerSettings.from_env()
    kinds = [k.strip() for k in args.queues.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in QUEUES]
    if unknown or not kinds:
        parser.error(f"--queues must name finetune and/or generate, not {unknown or kinds}")
    app = make_celery(settings)
    runtime = Runtime.create(settings, session_factory(make_engine(settings.database_url)))
    register_tasks(app, runtime)
    start_reconciler(make_celery(settings, fail_fast=True), runtime)
    worker_args = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        f"--queues={','.join(QUEUES[k] for k in kinds)}",
        f"--loglevel={args.loglevel}",
        "--without-gossip",
        "--without-mingle",
        f"--hostname={args.hostname}",
    ]
    app.worker_main(worker_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
