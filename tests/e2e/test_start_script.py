"""The README's first command: `scripts/start` serves the embedded default, and Ctrl-C stops everything."""

import os
import signal
import subprocess
import time

import httpx
import psutil
import pytest

from tests.e2e.conftest import ROOT, free_port, wait_for_job, wait_until


def test_start_serves_the_embedded_default_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEPEN_")}
    env.update(SEPEN_DATA_DIR=str(tmp_path / "var"), PORT=str(port), OMP_NUM_THREADS="1")
    script = subprocess.Popen(
        [str(ROOT / "scripts" / "start")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/readyz", timeout=1).status_code == 200, 240, "scripts/start to serve")
        key = (tmp_path / "var" / "api-key").read_text().strip()
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            assert [m["name"] for m in client.get("/models").json()] == ["sepen-toy", "sepen-tiny"]  # the default first
            job = client.post("/generate", json={"prompt": "a cherry and a sofa", "steps": 3}).json()
            assert wait_for_job(client, job["id"], timeout=120)["status"] == "succeeded"
        children = psutil.Process(script.pid).children(recursive=True)
        assert len(children) >= 2  # gateway and worker
    finally:
        os.killpg(script.pid, signal.SIGINT) if script.poll() is None else None
        try:
            script.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGKILL)
            pytest.fail("scripts/start did not stop on Ctrl-C")
    time.sleep(1)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
