"""Progress without polling, end to end: a real `sepen-worker` runs a generate job on the tiny model while a client
follows GET /jobs/{id}/events on the real gateway, and the job's webhook goes to a receiver on loopback that fails
twice (500) before it recovers; another receiver never answers and the delivery gives up. Every request the
receivers get is signed with the tenant's key. Postgres + Redis, and again in the embedded mode."""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from sepen_store.webhooks import verify_signature
from tests.conftest import postgres_database
from tests.e2e.conftest import Deployment, RedisServer, free_port, service_env, wait_for_job, wait_until

SECRET = "e2e-webhook-secret-0123456789"
MAX_ATTEMPTS = 3


class Receiver:
    """An HTTP server on loopback that records each POST and answers 500 to the first `failures` of them."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    receiver.requests.append({"headers": dict(self.headers), "body": body, "path": self.path})
                    failing = len(receiver.requests) <= receiver.failures
                self.send_response(500 if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/sepen?from=e2e"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module", params=["servers", "embedded"])
def deployment(request, tmp_path_factory):
    logs = tmp_path_factory.mktemp(f"logs-events-{request.param}")
    settings = {
        "SEPEN_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "SEPEN_WEBHOOK_SECRET": SECRET,
        "SEPEN_WEBHOOK_BACKOFF_S": "0.3",
        "SEPEN_WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "SEPEN_WEBHOOK_TIMEOUT_S": "2",
        "SEPEN_WEBHOOK_POLL_S": "0.2",
        "SEPEN_EVENTS_HEARTBEAT_S": "1",
        "SEPEN_EVENTS_POLL_S": "0.2",
        "SEPEN_DATA_DIR": str(tmp_path_factory.mktemp(f"data-events-{request.param}")),
    }
    with ExitStack() as stack:
        redis = None
        if request.param == "servers":
            redis = RedisServer(tmp_path_factory.mktemp("redis-events"))
            redis.start()
            stack.callback(redis.stop)
            settings.update(SEPEN_DATABASE_URL=stack.enter_context(postgres_database("sepen_e2e_events")))
            settings.update(SEPEN_BROKER_URL=redis.url)
        dep = Deployment(request.param, service_env(**settings), f"http://127.0.0.1:{free_port()}", logs, redis)
        stack.callback(dep.stop)
        dep.admin("migrate")
        dep.start_gateway()
        dep.start_worker()
        yield dep


@pytest.fixture(scope="module")
def tenant_key(deployment) -> tuple[str, str]:
    """An API key of tenant acme, and the key acme's webhooks are signed with (as sepen-admin prints it)."""
    return deployment.admin("create-key", "--tenant", "acme").split()[-1], deployment.admin(
        "webhook-key", "--tenant", "acme"
    )


def follow(client: httpx.Client, job_id: str, **headers: str) -> list[dict]:
    """The events of a stream, read until it ends (id, event, data), and its comment lines as {"comment": ...}."""
    events, fields = [], {}
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                events.append({"comment": line})
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif "data" in fields:
                events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
                fields = {}
    return [e for e in events if "comment" not in e]


def test_a_worker_run_streams_its_events_and_its_webhook_survives_a_failing_receiver(deployment, tenant_key):
    key, signing_key = tenant_key
    receiver = Receiver(failures=2)
    try:
        with deployment.client(key) as client:
            webhook = {"url": receiver.url, "events": ["running", "progress", "succeeded"]}
            body = {"prompt": "a photo of a cat and a dog", "model": "sepen-tiny", "steps": 12, "seed": 3}
            response = client.post("/generate", json={**body, "webhook": webhook})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            events = follow(client, job_id)

            # The stream: the job as it was when the client came, then what the worker did, then the end.
            seqs = [e["id"] for e in events]
            assert seqs == sorted(set(seqs)) and [e["data"]["seq"] for e in events] == seqs
            assert events[0]["event"] == "status" and events[0]["data"]["status"] in ("queued", "running")
            last = events[-1]["data"]
            assert last["status"] == "succeeded" and last["result"]["images"][0]["seed"] == 3
            assert last["progress"] == {"step": 12, "total": 12}
            if deployment.mode == "servers":  # every event, from Redis; the embedded mode polls the row
                assert "running" in [e["data"]["status"] for e in events[:-1]]
                reports = [e["data"]["progress"]["step"] for e in events if e["event"] == "progress"]
                assert reports and reports == sorted(reports) and reports[-1] == 12, events
            job = client.get(f"/jobs/{job_id}").json()
            assert job["status"] == "succeeded" and job["progress"] == last["progress"]

            # A client that reconnects: nothing more for the one that has the last event, the end for another.
            assert client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(seqs[-1])}).status_code == 204
            resumed = follow(client, job_id, **{"Last-Event-ID": str(seqs[-1] - 1)})
            assert resumed[-1]["id"] == seqs[-1] and resumed[-1]["data"]["status"] == "succeeded"

            # The webhook: every event asked for, delivered in the end, the first two attempts answered 500.
            def settled():
                deliveries = client.get(job["links"]["deliveries"]).json()["deliveries"]
                return deliveries if deliveries and all(d["state"] != "pending" for d in deliveries) else None

            deliveries = wait_until(settled, 60, "the webhook deliveries")
        assert {d["state"] for d in deliveries} == {"delivered"}, deliveries
        assert {d["event"] for d in deliveries} == {"running", "progress", "succeeded"}
        statuses = [entry["status"] for d in deliveries for entry in d["log"]]
        assert sorted(statuses) == [204] * len(deliveries) + [500, 500]
        retried = [d for d in deliveries if d["attempts"] > 1]
        assert retried and all(d["log"][-1]["status"] == 204 and d["attempts"] == len(d["log"]) for d in retried)
        assert len(receiver.requests) == sum(d["attempts"] for d in deliveries)

        by_id = {d["id"]: d for d in deliveries}
        for request in receiver.requests:
            headers = request["headers"]
            assert request["path"] == "/hooks/sepen?from=e2e"
            assert verify_signature(signing_key, headers["Sepen-Signature"], request["body"])
            assert not verify_signature(signing_key, headers["Sepen-Signature"], request["body"] + b" ")
            payload = json.loads(request["body"])
            delivery = by_id[headers["Sepen-Delivery"]]  # the same id on every attempt
            assert headers["Sepen-Event"] == delivery["event"] and payload["seq"] == delivery["seq"]
            assert payload["job_id"] == job_id and headers["Content-Type"] == "application/json"
        final = [json.loads(r["body"]) for r in receiver.requests if r["headers"]["Sepen-Event"] == "succeeded"]
        assert final[-1]["result"]["images"][0]["seed"] == 3 and final[-1] == last | {"at": final[-1]["at"]}
    finally:
        receiver.close()


def test_a_receiver_that_never_answers_is_given_up_on_after_the_last_attempt(deployment, tenant_key):
    key, _ = tenant_key
    closed = f"http://127.0.0.1:{free_port()}/nobody"  # nothing listens there
    with deployment.client(key) as client:
        body = {"prompt": "a cat", "model": "sepen-tiny", "steps": 2, "webhook": {"url": closed}}
        response = client.post("/generate", json=body)
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"])

        def given_up():
            deliveries = client.get(job["links"]["deliveries"]).json()["deliveries"]
            return deliveries if deliveries and deliveries[0]["state"] == "failed" else None

        (delivery,) = wait_until(given_up, 60, "the delivery to fail")
    assert delivery["event"] == job["status"] and delivery["attempts"] == MAX_ATTEMPTS
    assert [entry["status"] for entry in delivery["log"]] == [None] * MAX_ATTEMPTS
    assert all("Error" in entry["error"] for entry in delivery["log"]), delivery["log"]
    at = [entry["at"] for entry in delivery["log"]]
    assert at == sorted(at) and delivery["finished_at"] is not None and delivery["next_attempt_at"] is None


def test_another_tenant_sees_neither_the_stream_nor_the_deliveries(deployment, tenant_key):
    key, _ = tenant_key
    other = deployment.admin("create-key", "--tenant", "globex").split()[-1]
    with deployment.client(key) as client:
        job_id = client.post("/generate", json={"prompt": "a dog", "model": "sepen-tiny", "steps": 2}).json()["id"]
    with deployment.client(other) as client:
        for path in ("events", "deliveries"):
            response = client.get(f"/jobs/{job_id}/{path}")
            assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
