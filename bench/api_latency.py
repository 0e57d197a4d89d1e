"""Latency of the gateway under concurrent clients on loopback: POST /generate (store + enqueue only,
no worker consumes) and GET /jobs/{id}, against Postgres and Redis. Prints p50/p99 and requests/s.

    python bench/api_latency.py --clients 50 --seconds 20 [--gateway-workers 1] [--json out.json]

It creates a throwaway Postgres database and uses Redis db 12, starts uvicorn itself, and drops the
database at the end. The load generator runs in this process (asyncio + httpx), on the same 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(base: str, key: str, clients: int, seconds: float, make_request) -> list[float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30
    ) as client:

        async def one_client(i: int) -> None:
            nonlocal errors
            n = 0
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await make_request(client, i, n)
                latencies.append(time.perf_counter() - start)
                errors += response.status_code >= 400
                n += 1

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    if errors:
        print(f"warning: {errors} error responses", file=sys.stderr)
    return latencies


def summary(name: str, latencies: list[float], seconds: float) -> dict:
    ordered = sorted(latencies)
    return {
        "endpoint": name,
        "requests": len(ordered),
        "rps": len(ordered) / seconds,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--gateway-workers", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()

    database = f"sepen_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    redis.Redis(db=12).flushdb()
    port = free_port()
    env = {
        **os.environ,
        "SEPEN_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        "SEPEN_BROKER_URL": "redis://127.0.0.1:6379/12",
    }
    gateway = None
    try:
        subprocess.run([str(BIN / "sepen-admin"), "migrate"], env=env, check=True, cwd=ROOT)
        key = subprocess.run(
            [str(BIN / "sepen-admin"), "create-key", "--tenant", "bench"],
            env=env,
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        gateway = subprocess.Popen(
            [
                str(BIN / "uvicorn"),
                "--factory",
                "service.app:app_from_env",
                "--port",
                str(port),
                "--workers",
                str(args.gateway_workers),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=env,
            cwd=ROOT,
        )
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        async def post_generate(client, i, n):
            return await client.post(
                "/generate", json={"prompt": f"a photo of a cat and a dog {i} {n}", "steps": 20, "seed": n}
            )

        results = [
            summary(
                "POST /generate", asyncio.run(load(base, key, args.clients, args.seconds, post_generate)), args.seconds
            )
        ]
        job_ids = [
            j["id"]
            for j in httpx.get(f"{base}/jobs?limit=100", headers={"Authorization": f"Bearer {key}"}).json()["jobs"]
        ]

        async def get_job(client, i, n):
            return await client.get(f"/jobs/{job_ids[(i + n) % len(job_ids)]}")

        results.append(
            summary("GET /jobs/{id}", asyncio.run(load(base, key, args.clients, args.seconds, get_job)), args.seconds)
        )
        queued = redis.Redis(db=12).llen("sepen.generate")
        print(
            f"{args.clients} clients, {args.seconds:.0f} s each, {args.gateway_workers} uvicorn worker(s); "
            f"{queued} messages enqueued"
        )
        print("| endpoint | requests | req/s | p50 (ms) | p99 (ms) |\n|---|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['endpoint']} | {r['requests']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "clients": args.clients,
                        "seconds": args.seconds,
                        "gateway_workers": args.gateway_workers,
                        "results": results,
                    },
                    indent=2,
                )
            )
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


if __name__ == "__main__":
    main()
