"""The worker's webhook sender against a receiver on loopback: one signed POST per attempt with the delivery's
headers, a redirect answered but not followed (and retried later), a host no longer allowed never called, the
last attempt giving up; the delivery loop runs only when webhooks are allowed."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.jobs import claim_job, create_job
from sepen_store.settings import WorkerSettings
from sepen_store.webhooks import job_deliveries, take_due_deliveries, tenant_key, verify_signature
from worker.webhooks import deliver, start_delivery_loop

SECRET = "worker-test-secret-0123456789"


@pytest.fixture
def receiver():
    """(base URL, the requests it got): answers 302 to a path under /moved, 200 to others."""
    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            moved = self.path.startswith("/moved")
            self.send_response(302 if moved else 200)
            if moved:
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'sepen.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def settings(**changes) -> WorkerSettings:
    values = {
        "webhook_allowed_hosts": ("127.0.0.1",),
        "webhook_secret": SECRET,
        "webhook_backoff_s": 30.0,
        "webhook_max_attempts": 2,
        **changes,
    }
    return WorkerSettings(**values)


def due_delivery(sessions, url: str):
    """A running job of tenant acme whose webhook asked for `running`, and its delivery, taken."""
    with sessions() as s:
        job, _ = create_job(
            s, "acme", "generate", {"n": uuid.uuid4().hex, "webhook": {"url": url, "events": ["running"]}}
        )
        claim_job(s, job.id, "w1", lease_s=60)
        (delivery,) = take_due_deliveries(s, lease_s=60)
    return job, delivery


def test_a_delivery_is_one_signed_post_with_its_headers(store, receiver):
    base, requests = receiver
    job, delivery = due_delivery(store, f"{base}/hook?x=1")
    assert deliver(store, settings(), delivery) == "delivered"
    (request,) = requests
    assert request["path"] == "/hook?x=1"
    headers = request["headers"]
    assert headers["Sepen-Event"] == "running" and headers["Sepen-Delivery"] == delivery.id
    assert headers["Content-Type"] == "application/json" and headers["User-Agent"].startswith("sepen-webhooks/")
    assert verify_signature(tenant_key(SECRET, "acme"), headers["Sepen-Signature"], request["body"])
    assert not verify_signature(tenant_key(SECRET, "globex"), headers["Sepen-Signature"], request["body"])
    body = json.loads(request["body"])
    assert body["job_id"] == job.id and body["status"] == "running" and body["seq"] == 1
    with store() as s:
        (row,) = job_deliveries(s, job.id)
        assert row.state == "delivered" and row.log[0]["status"] == 200 and row.log[0]["error"] is None


def test_a_redirect_is_not_followed_and_the_last_attempt_gives_up(store, receiver):
    base, requests = receiver
    job, delivery = due_delivery(store, f"{base}/moved")
    assert deliver(store, settings(), delivery) == "pending"  # retried after the back-off
    assert [r["path"] for r in requests] == ["/moved"]  # the Location was not called
    with store() as s:
        (row,) = job_deliveries(s, job.id)
        assert row.log[0]["status"] == 302 and row.log[0]["error"] == "answered 302"
    job, delivery = due_delivery(store, f"{base}/moved/again")
    assert deliver(store, settings(webhook_max_attempts=1), delivery) == "failed"  # no tries left
    assert len(requests) == 2


def test_a_host_no_longer_allowed_is_not_called(store, receiver):
    base, requests = receiver
    job, delivery = due_delivery(store, f"{base}/hook")
    assert deliver(store, settings(webhook_allowed_hosts=("hooks.example.com",)), delivery) == "failed"
    assert requests == []
    with store() as s:
        (row,) = job_deliveries(s, job.id)
        assert "SEPEN_WEBHOOK_ALLOWED_HOSTS" in row.log[0]["error"] and row.log[0]["status"] is None


def test_the_loop_runs_only_when_webhooks_are_allowed(store):
    assert start_delivery_loop(store, WorkerSettings()) is None
    thread = start_delivery_loop(store, settings(webhook_poll_s=0.05))
    assert thread is not None and thread.is_alive() and thread.daemon
