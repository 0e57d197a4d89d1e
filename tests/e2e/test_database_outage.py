"""A worker whose database goes away (a TCP proxy in front of the real Postgres, cut and restored) waits,
holding the one message it took, instead of failing the job or taking more; when the database is back the
jobs run. The gateway, which still reaches the database, keeps accepting jobs meanwhile."""

import socket
import threading
from contextlib import ExitStack, suppress

import pytest
import redis

from tests.conftest import postgres_database
from tests.e2e.conftest import Deployment, RedisServer, free_port, service_env, wait_for_job, wait_until


class CuttableProxy:
    """Forwards loopback TCP connections to a target; cut() drops them all and refuses new ones until restore()."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
            listener, self._listener = self._listener, None
        for sock in [listener, *sockets]:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def deployment_with_proxy(tmp_path_factory):
    with ExitStack() as stack:
        broker = RedisServer(tmp_path_factory.mktemp("redis"))
        broker.start()
        stack.callback(broker.stop)
        database = stack.enter_context(postgres_database("sepen_outage"))
        proxy = CuttableProxy(5432)
        proxy.restore()
        stack.callback(proxy.cut)
        env = service_env(
            SEPEN_DATABASE_URL=database,
            SEPEN_BROKER_URL=broker.url,
            SEPEN_DATA_DIR=str(tmp_path_factory.mktemp("data")),
        )
        dep = Deployment("servers", env, f"http://127.0.0.1:{free_port()}", tmp_path_factory.mktemp("logs"), broker)
        stack.callback(dep.stop)
        dep.start_gateway()
        dep.start_worker(SEPEN_DATABASE_URL=database.replace(":5432/", f":{proxy.port}/"))
        key = dep.admin("create-key", "--tenant", "acme").split()[-1]
        yield dep, proxy, key


def test_a_worker_waits_out_a_database_outage_without_failing_or_taking_jobs(deployment_with_proxy):
    dep, proxy, key = deployment_with_proxy
    queue = redis.Redis.from_url(dep.redis.url)
    with dep.client(key) as client:

        def submit(seed):
            response = client.post("/generate", json={"prompt": "a photo of a cat", "steps": 2, "seed": seed})
            assert response.status_code == 202, response.text
            return response.json()["id"]

        assert wait_for_job(client, submit(0), timeout=120)["status"] == "succeeded"  # the worker is warm
        proxy.cut()
        held, waiting = submit(1), submit(2)
        log = dep.logs / "worker-0.log"
        wait_until(lambda: "database unreachable" in log.read_text(), 30, "the worker to notice the outage")
        wait_until(lambda: queue.llen("sepen.generate") == 1, 10, "one message left in the broker")
        for _ in range(3):  # the worker holds one message and leaves the other; neither job fails
            assert queue.llen("sepen.generate") == 1
            assert {client.get(f"/jobs/{j}").json()["status"] for j in (held, waiting)} == {"queued"}
            threading.Event().wait(1.0)
        proxy.restore()
        for job_id in (held, waiting):
            assert wait_for_job(client, job_id, timeout=120)["status"] == "succeeded"
