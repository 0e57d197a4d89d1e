"""Log lines of the gateway, the workers and their job processes, as text or as JSON (SEPEN_LOG_FORMAT), each
line written while a job runs carrying that job's id.

    with job_logging(job_id):      # every line logged in this context (this thread) names the job
        log.info("...")

A thread started inside the context sees the id only when it runs in a copy of it (contextvars.copy_context).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
JOB_ID: ContextVar[str | None] = ContextVar("sepen_job_id", default=None)


@contextmanager
def job_logging(job_id: str) -> Iterator[None]:
    """Every line logged in this context carries `job_id`."""
    token = JOB_ID.set(job_id)
    try:
        yield
    finally:
        JOB_ID.reset(token)


def job_id_of(record: logging.LogRecord) -> str | None:
    """The job a line was written for: an explicit `extra={"job_id": ...}`, else the running job's."""
    return getattr(record, "job_id", None) or JOB_ID.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, process, pid, and job_id and
    exception when there are any."""

    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": self.process,
            "pid": record.process,
        }
        job_id = job_id_of(record)
        if job_id:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger[process] job=<id>: message`, the process and job parts only where they apply."""

    def __init__(self, process: str | None = None):
        super().__init__("%(asctime)s %(levelname)s %(name)s%(sepen_where)s: %(message)s")
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        job_id = job_id_of(record)
        record.sepen_where = (f"[{self.process}]" if self.process else "") + (f" job={job_id}" if job_id else "")
        return super().format(record)


def formatter(log_format: str, process: str | None = None) -> logging.Formatter:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    return JsonFormatter(process or "sepen") if log_format == "json" else TextFormatter(process)


def configure_logging(
    log_format: str, level: int | str = logging.INFO, *, process: str | None = None, also: Iterable[str] = ()
) -> None:
    """Send the root logger's lines to stderr in `log_format` (replacing its handlers). In JSON, also the handlers
    of the loggers named in `also` (a server's own loggers that do not propagate, such as uvicorn's), and Python's
    warnings, so that every line parses. For a process's entry point only: tests and libraries leave the root
    logger alone."""
    chosen = formatter(log_format, process)
    handler = logging.StreamHandler()
    handler.setFormatter(chosen)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if log_format == "json":
        for name in also:
            for other in logging.getLogger(name).handlers:
                other.setFormatter(chosen)
        logging.captureWarnings(True)
