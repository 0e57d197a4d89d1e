"""Log lines as JSON or text: one object per line with the running job's id (or one given explicitly), exceptions
kept whole, no id once the job's context has ended; and an unknown format refused."""

import json
import logging
import sys

import pytest

from sepen_store.logs import formatter, job_logging


def record(message: str, *args, exc_info=None, **extra) -> logging.LogRecord:
    made = logging.LogRecord("worker.work", logging.WARNING, __file__, 1, message, args, exc_info)
    made.__dict__.update(extra)
    return made


def test_json_lines_carry_the_running_jobs_id():
    json_format = formatter("json", "job process")
    with job_logging("f" * 32):
        inside = json.loads(json_format.format(record("job %s failed: %s", "f" * 32, "a\nb")))
        with job_logging("e" * 32):
            nested = json.loads(json_format.format(record("x")))
        back = json.loads(json_format.format(record("y")))
    outside = json.loads(json_format.format(record("z")))
    assert inside["message"] == f"job {'f' * 32} failed: a\nb" and inside["job_id"] == "f" * 32
    assert inside["level"] == "WARNING" and inside["logger"] == "worker.work" and inside["process"] == "job process"
    assert inside["time"].endswith("+00:00") and isinstance(inside["pid"], int)
    assert nested["job_id"] == "e" * 32 and back["job_id"] == "f" * 32
    assert "job_id" not in outside
    explicit = json.loads(json_format.format(record("w", job_id="d" * 32)))
    assert explicit["job_id"] == "d" * 32


def test_json_keeps_the_exception_and_text_names_the_job():
    try:
        raise ValueError("bad value")
    except ValueError:
        failed = record("it broke", exc_info=sys.exc_info())
    entry = json.loads(formatter("json", "worker").format(failed))
    assert entry["exception"].startswith("Traceback") and "ValueError: bad value" in entry["exception"]
    with job_logging("c" * 32):
        text = formatter("text", "job process").format(record("hello"))
    assert f"WARNING worker.work[job process] job={'c' * 32}: hello" in text
    assert formatter("text").format(record("hello")).endswith(" WARNING worker.work: hello")  # no process, no job


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        formatter("xml")
