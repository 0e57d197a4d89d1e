"""Requests per second of the gateway, this working tree against an earlier commit, side by side in one run:
POST /generate (validate, check quotas, store, enqueue; no worker consumes) and GET /jobs/{id}, on loopback.

    python bench/api_latency.py [--baseline REV] [--rounds 5] [--seconds 8] [--clients 32] [--json out.json]

The baseline commit (default: HEAD when the working tree has changes, else HEAD~1) is checked out into a temporary
git worktree. Each side gets a fresh Postgres database migrated by its own code, its own Redis database on a private
redis-server, and its own uvicorn (--gateway-workers processes); both run the whole time and take turns: each round
loads one side, then the other (the order alternating between rounds), each endpoint for --seconds. The table gives
the medians over rounds, and the median of each round's candidate/baseline ratio. Every client acts for its own
tenant (--clients tenants, one API key each), with the service's default quotas and a rate limit too high to refuse
anything (it is still counted in Redis).

The load comes from this process: keep-alive HTTP/1.1 connections written by hand over asyncio streams (a few tens
of microseconds a request, well below the gateway's cost), on the same machine. Beside requests per second, each
run reports the CPU time the gateway's processes spent per request (user + system, from /proc): on a machine
shared with other work, requests per second move with the load, and CPU time per request much less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import psycopg

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
GENERATE = json.dumps({"prompt": "a photo of a cat and a dog", "model": "sepen-tiny", "steps": 20, "seed": 7})
ENDPOINTS = ("POST /generate", "GET /jobs/{id}")
SIDES = ("baseline", "candidate")
MEASURES = ("rps", "cpu_ms_per_request", "p50_ms", "p99_ms", "load_1m")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def default_baseline() -> str:
    """The commit before the code under test: HEAD while the working tree has changes, else HEAD's parent."""
    return "HEAD" if git("status", "--porcelain", "--untracked-files=no") else "HEAD~1"


@contextmanager
def worktree(rev: str):
    path = Path(tempfile.mkdtemp(prefix="sepen-bench-")) / "tree"
    git("worktree", "add", "--detach", str(path), rev)
    try:
        yield path
    finally:
        git("worktree", "remove", "--force", str(path))
        shutil.rmtree(path.parent, ignore_errors=True)


@contextmanager
def redis_server():
    port = free_port()
    directory = tempfile.mkdtemp(prefix="sepen-bench-redis-")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--maxmemory-policy", "noeviction", "--dir", directory],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), 0.5).close() is None, 10, "redis-server")
        yield port
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def database():
    name = f"sepen_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Side:
    name: str  # baseline | candidate
    label: str  # the commit, or "working tree"
    tree: Path
    env: dict[str, str]
    port: int = 0
    keys: list[str] = field(default_factory=list)
    job_ids: list[list[str]] = field(default_factory=list)  # per client
    process: subprocess.Popen | None = None

    def python(self, code: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=self.tree, env=self.env, capture_output=True, text=True, check=False
        )
        if run.returncode:
            raise SystemExit(f"{self.name}: {run.stderr[-2000:]}")
        return run.stdout

    def start(self, tenants: int, gateway_workers: int) -> None:
        self.python(f"from sepen_store.database import upgrade_database; upgrade_database({self.env['DB']!r})")
        self.keys = self.python(
            "from sepen_store.auth import create_api_key\n"
            "from sepen_store.database import make_engine, session_factory\n"
            f"s = session_factory(make_engine({self.env['DB']!r}))()\n"
            f"for i in range({tenants}): print(create_api_key(s, f'bench-{{i}}', 'bench'))\n"
        ).split()
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.app:app_from_env", "--host", "127.0.0.1"]
            + ["--port", str(self.port), "--workers", str(gateway_workers), "--log-level", "warning"]
            + ["--no-access-log"],
            cwd=self.tree,
            env=self.env,
        )
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200, 60, self.name)

    def cpu_s(self) -> float:
        """CPU seconds the gateway's processes (uvicorn and its --workers children) have used so far."""
        root = psutil.Process(self.process.pid)
        return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)


def side_env(tree: Path, database_url: str, redis_port: int, redis_db: int, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEPEN_")}
    env.update(
        PYTHONPATH=str(tree),  # before the editable install's finder: this tree's packages
        DB=database_url,
        SEPEN_DATABASE_URL=database_url,
        SEPEN_BROKER_URL=f"redis://127.0.0.1:{redis_port}/{redis_db}",
        SEPEN_DATA_DIR=str(data_dir),
        SEPEN_RATE_LIMIT_PER_MINUTE="100000000",
        OMP_NUM_THREADS="1",
    )
    return env


# ---- load ---------------------------------------------------------------------------------------


def request_bytes(method: str, path: str, key: str, body: str | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
    if body is None:
        return (head + "\r\n").encode()
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()


async def one_client(port: int, requests: list[bytes], deadline: float, latencies: list[float], statuses: dict):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(requests[n % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            status = int(head[9:12])
            statuses[status] = statuses.get(status, 0) + 1
            n += 1
    finally:
        writer.close()


def run_load(port: int, per_client: list[list[bytes]], seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(one_client(port, reqs, deadline, latencies, statuses) for reqs in per_client))

    asyncio.run(main())
    ordered = sorted(latencies) or [0.0]
    return {
        "requests": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        "statuses": statuses,
    }


def seed_jobs(side: Side, per_client: int) -> None:
    """A few jobs per client's tenant, for GET /jobs/{id} to read."""
    side.job_ids = []
    for key in side.keys:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        ids = []
        for _ in range(per_client):
            answer = httpx.post(f"http://127.0.0.1:{side.port}/generate", content=GENERATE, headers=headers)
            answer.raise_for_status()
            body = answer.json()
            ids.append(body["job"]["id"] if "job" in body else body["id"])  # {"job": {...}} before one job shape
        side.job_ids.append(ids)


def measure(side: Side, endpoint: str, seconds: float, clients: int) -> dict:
    if endpoint == "POST /generate":
        per_client = [
            [request_bytes("POST", "/generate", side.keys[i % len(side.keys)], GENERATE)] for i in range(clients)
        ]
    else:
        per_client = [
            [
                request_bytes("GET", f"/jobs/{job}", side.keys[i % len(side.keys)])
                for job in side.job_ids[i % len(side.keys)]
            ]
            for i in range(clients)
        ]
    load, cpu_before = os.getloadavg()[0], side.cpu_s()
    result = run_load(side.port, per_client, seconds)
    cpu_ms = 1000 * (side.cpu_s() - cpu_before) / max(1, result["requests"])
    return {"load_1m": load, "cpu_ms_per_request": cpu_ms, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="the commit to compare with (default: see above)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="per endpoint, side and round")
    parser.add_argument("--clients", type=int, default=32, help="concurrent connections, each its own tenant")
    parser.add_argument("--gateway-workers", type=int, default=1, help="uvicorn --workers of each side")
    parser.add_argument("--json")
    args = parser.parse_args()

    baseline_rev = args.baseline or default_baseline()
    baseline_commit = git("rev-parse", "--short", baseline_rev)
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    candidate_label = f"{git('rev-parse', '--short', 'HEAD')}{' + working tree' if dirty else ''}"
    with ExitStack() as stack:
        tree = stack.enter_context(worktree(baseline_rev))
        redis_port = stack.enter_context(redis_server())
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sepen-bench-data-")))
        sides = []
        for index, (name, label, path) in enumerate(
            [("baseline", baseline_commit, tree), ("candidate", candidate_label, ROOT)]
        ):
            env = side_env(path, stack.enter_context(database()), redis_port, index, data / name)
            side = Side(name, label, path, env)
            stack.callback(side.stop)
            side.start(args.clients, args.gateway_workers)
            sides.append(side)
        for side in sides:  # warm-up: connection pools, caches, first-use imports
            seed_jobs(side, per_client=4)
            for endpoint in ENDPOINTS:
                measure(side, endpoint, 2.0, args.clients)
        runs = []
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                for endpoint in ENDPOINTS:
                    result = measure(side, endpoint, args.seconds, args.clients)
                    runs.append({"round": round_, "side": side.name, "endpoint": endpoint, **result})
                    print(
                        f"round {round_} {side.name:9} {endpoint:15} {result['rps']:7.0f} req/s "
                        f"{result['cpu_ms_per_request']:5.2f} ms CPU/req  p50 {result['p50_ms']:6.1f} ms  "
                        f"p99 {result['p99_ms']:6.1f} ms  {result['statuses']}  load {result['load_1m']:.1f}",
                        flush=True,
                    )

    print(
        f"\n{args.rounds} rounds x {args.seconds:.0f} s per endpoint and side, {args.clients} clients (one tenant "
        f"each), {args.gateway_workers} uvicorn worker(s) per side; baseline {baseline_commit}, candidate "
        f"{candidate_label}"
    )
    print(
        "| endpoint | req/s baseline | req/s candidate | ratio | ratio within rounds | CPU ms/req baseline | "
        "candidate | CPU ratio | p50 ms baseline / candidate |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = []
    for endpoint in ENDPOINTS:

        def of(side: str, key: str, endpoint: str = endpoint) -> list[float]:
            return [r[key] for r in runs if r["side"] == side and r["endpoint"] == endpoint]

        row = {
            "endpoint": endpoint,
            **{f"{side}_{key}": statistics.median(of(side, key)) for side in SIDES for key in MEASURES},
            "round_ratios": [c / b for b, c in zip(of("baseline", "rps"), of("candidate", "rps"), strict=True)],
        }
        row["ratio"] = row["candidate_rps"] / row["baseline_rps"]
        row["median_round_ratio"] = statistics.median(row["round_ratios"])
        row["cpu_ratio"] = row["baseline_cpu_ms_per_request"] / row["candidate_cpu_ms_per_request"]
        summary.append(row)
        print(
            f"| {endpoint} | {row['baseline_rps']:.0f} | {row['candidate_rps']:.0f} | {row['ratio']:.2f}x | "
            f"{row['median_round_ratio']:.2f}x | {row['baseline_cpu_ms_per_request']:.2f} | "
            f"{row['candidate_cpu_ms_per_request']:.2f} | {row['cpu_ratio']:.2f}x | "
            f"{row['baseline_p50_ms']:.0f} / {row['candidate_p50_ms']:.0f} |"
        )
    errors = {s: c for r in runs for s, c in r["statuses"].items() if s >= 400}
    if errors:
        print(f"warning: error answers {errors}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "baseline": baseline_commit,
                    "candidate": candidate_label,
                    "rounds": args.rounds,
                    "seconds": args.seconds,
                    "clients": args.clients,
                    "gateway_workers": args.gateway_workers,
                    "cpus": os.cpu_count(),
                    "summary": summary,
                    "runs": runs,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
