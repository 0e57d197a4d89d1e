"""The queue contract between gateway and workers: task names, queues, and the Celery app both build.

A message carries only the job id; the job row is the truth. Finetune and generate jobs use
separate queues so a long finetune never holds up image requests on a generate worker.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from sepen_store.settings import Settings

QUEUES = {"finetune": "sepen.finetune", "generate": "sepen.generate"}
TASKS = {"finetune": "sepen.run_finetune", "generate": "sepen.run_generate"}


def broker_settings(settings: Settings) -> tuple[str, dict]:
    if settings.embedded_broker:
        folder = (settings.data_dir / "broker").resolve()
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return "filesystem://", {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
        }
    # Short socket timeouts: a gateway whose broker is down must answer (the job is already stored), not hang.
    return settings.broker_url, {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
    }


def make_celery(settings: Settings, *, fail_fast: bool = False) -> Celery:
    """The Celery app of the contract. fail_fast (for senders: the gateway, the reconciler): one connection
    try, no kombu retry back-off (about 6 s), since the job row is already stored and is re-sent later."""
    url, transport_options = broker_settings(settings)
    if fail_fast:
        transport_options = {**transport_options, "max_retries": 1, "interval_start": 0}
    app = Celery("sepen", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(q) for q in QUEUES.values()],
        task_routes={TASKS[k]: {"queue": QUEUES[k]} for k in TASKS},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_heartbeat=0,
    )
    return app


def enqueue(app: Celery, kind: str, job_id: str) -> None:
    """Send a job's message; raises kombu/redis errors if the broker is down (the reconciler retries)."""
    app.send_task(TASKS[kind], args=[job_id], queue=QUEUES[kind], retry=False)
