"""What the gateway's /metrics reads at scrape time: jobs by kind and status (one GROUP BY), and the messages
waiting in each queue of the broker (Redis list lengths, or the embedded broker's files)."""

from __future__ import annotations

import os

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sepen_store.jobs import STATUSES
from sepen_store.queue import QUEUES
from sepen_store.tables import Job


def job_counts(session: Session) -> dict[tuple[str, str], int]:
    """{(kind, status): jobs}, every kind and status listed (0 when there are none), so a series never vanishes."""
    counts = {(kind, status): 0 for kind in QUEUES for status in STATUSES}
    rows = session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))
    for kind, status, count in rows:
        counts[(kind, status)] = count
    return counts


def queue_depths(app: Celery) -> dict[str, int] | None:
    """{queue name: messages waiting} for each job queue (a Redis queue counts its priority sub-queues too; taken
    but unacknowledged messages are not waiting); None for a transport other than Redis or the embedded one.
    Raises the transport's errors when the broker is down."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        transport = connection.transport.driver_type
        if transport == "redis":
            keys = {
                queue: dict.fromkeys(channel._q_for_pri(queue, pri) for pri in channel.priority_steps)
                for queue in QUEUES.values()
            }
            with channel.client.pipeline(transaction=False) as pipe:
                for queue_keys in keys.values():
                    for key in queue_keys:
                        pipe.llen(key)
                lengths = iter(pipe.execute())
            return {queue: sum(next(lengths) for _ in queue_keys) for queue, queue_keys in keys.items()}
        if transport == "filesystem":
            # The filesystem transport names each message <time>_<uuid>.<queue>.msg, all queues in one folder.
            names = [name.partition(".")[2] for name in os.listdir(channel.data_folder_in)]
            return {queue: names.count(f"{queue}.msg") for queue in QUEUES.values()}
        return None
