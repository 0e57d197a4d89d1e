"""Real servers for end-to-end tests: a fresh Postgres database, a private redis-server we may stop and
restart, the gateway under uvicorn and `sepen-worker` processes, all on loopback; or the embedded
mode (SQLite file + filesystem broker) with the same gateway and worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import postgres_database

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def launch_gateway(env: dict[str, str], port: int, log_path: Path, *, log_level: str = "warning") -> subprocess.Popen:
    """The gateway as the deployment runs it (uvicorn, one process) on a loopback port with `env`, its output in
    `log_path`; returns once /healthz answers. The caller terminates it."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(BIN / "uvicorn"), "--factory", "service.app:app_from_env", "--host", "127.0.0.1"]
            + ["--port", str(port), "--workers", "1", "--log-level", log_level],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/healthz"
    wait_until(lambda: httpx.get(url, timeout=1).status_code == 200, 60, "the gateway")
    return process


class RedisServer:
    """A redis-server of our own (no persistence, like the deployment's broker restarts), stoppable."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close() is None, 10, "redis")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class Deployment:
    mode: str
    env: dict[str, str]
    base_url: str
    logs: Path
    redis: RedisServer | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    gateway: subprocess.Popen | None = None

    def admin(self, *args: str) -> str:
        run = subprocess.run(
            [str(BIN / "sepen-admin"), *args], env=self.env, capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    def start_worker(self, queues: str | None = None, **env: str) -> subprocess.Popen:
        """A `sepen-worker` process serving `queues` (default: all), with the deployment's environment (and `env`'s
        changes to it)."""
        log = open(self.logs / f"worker-{len(self.workers)}.log", "w")
        proc = subprocess.Popen(
            [str(BIN / "sepen-worker"), "--loglevel", "INFO", *(["--queues", queues] if queues else [])],
            env={**self.env, **env},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def start_gateway(self) -> None:
        port = int(self.base_url.rsplit(":", 1)[1])
        self.gateway = launch_gateway(self.env, port, self.logs / "gateway.log")

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def stop(self) -> None:
        for proc in [*self.workers, self.gateway]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.redis is not None:
            self.redis.stop()


def service_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEPEN_")}
    env.update(
        {
            "SEPEN_JOB_LEASE_S": "6",
            "SEPEN_REQUEUE_AFTER_S": "4",
            "SEPEN_RECONCILE_INTERVAL_S": "1",
            "SEPEN_PROGRESS_INTERVAL_S": "0.2",
            "SEPEN_CHECKPOINT_EVERY": "5",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(settings)
    return env


@pytest.fixture(scope="session")
def sdxl_directory(tmp_path_factory) -> Path:
    """The tiny SDXL-shaped random model saved as a diffusers StableDiffusionXLPipeline directory."""
    from sepen_core.models import build_tiny_xl_model

    path = tmp_path_factory.mktemp("models") / "tiny-xl"
    build_tiny_xl_model(0).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["servers", "embedded"])
def deployment(request, tmp_path_factory, sdxl_directory):
    logs = tmp_path_factory.mktemp(f"logs-{request.param}")
    base_url = f"http://127.0.0.1:{free_port()}"
    stack = ExitStack()
    # The default models, and an SDXL directory served beside them.
    models = {"SEPEN_MODELS": f"sepen-toy=toy,sepen-tiny=tiny,tiny-xl={sdxl_directory}"}
    if request.param == "servers":
        redis = RedisServer(tmp_path_factory.mktemp("redis"))
        redis.start()
        database = stack.enter_context(postgres_database("sepen_e2e"))
        env = service_env(
            SEPEN_DATABASE_URL=database,
            SEPEN_BROKER_URL=redis.url,
            SEPEN_DATA_DIR=str(tmp_path_factory.mktemp("data")),
            **models,
        )
    else:
        redis = None
        env = service_env(SEPEN_DATA_DIR=str(tmp_path_factory.mktemp("embedded")), **models)
    dep = Deployment(request.param, env, base_url, logs, redis)
    with stack:
        try:
            dep.admin("migrate")
            dep.start_gateway()
            dep.start_worker()
            yield dep
        finally:
            dep.stop()


@pytest.fixture(scope="module")
def api_key(deployment) -> str:
    return deployment.admin("create-key", "--tenant", "acme", "--name", "e2e").split()[-1]


@pytest.fixture(scope="module")
def other_key(deployment) -> str:
    return deployment.admin("create-key", "--tenant", "globex").split()[-1]


def wait_for_job(
    client: httpx.Client, job_id: str, statuses=("succeeded", "failed", "canceled"), timeout: float = 180
) -> dict:
    def done():
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(done, timeout, f"job {job_id} to reach {statuses}", interval=0.3)
