"""An S3-compatible bucket holding the bytes of blobs (SEPEN_BLOB_BACKEND=s3): AWS S3, or a server of one's own such as
SeaweedFS or MinIO. sepen_store.blobs decides what goes where; this module only moves bytes and signs URLs."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from sepen_store.errors import NotFound, StorageUnavailable
from sepen_store.settings import Settings

log = logging.getLogger(__name__)

# Parts of 64 MiB above 64 MiB: a checkpoint of hundreds of MB goes up in a few parts, each retried on its own, and
# the 5 GB limit of a single PUT never applies.
TRANSFER = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=4)
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
# How long what the last operation or probe said of the store is believed: a busy gateway probes at most this often.
HEALTH_TTL_S = 5.0


def _config(settings: Settings) -> Config:
    own_server = bool(settings.s3_endpoint_url) and "amazonaws.com" not in settings.s3_endpoint_url
    return Config(
        region_name=settings.s3_region,
        signature_version="s3v4",
        # A server of one's own is addressed by path (http://host:8333/bucket/key): it has no wildcard DNS.
        s3={"addressing_style": "path" if own_server else "auto"},
        # Checksums only where S3 requires them: the servers S3 clients also talk to do not all take the CRC
        # headers boto3 sends by default since 1.36.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 4, "mode": "standard"},
        max_pool_connections=16,
    )


class ObjectStore:
    """One bucket of an S3-compatible server. Thread-safe (boto3 clients are); one per process, made from settings."""

    def __init__(self, settings: Settings):
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.region = settings.s3_region
        self.presign_ttl_s = settings.s3_presign_ttl_s
        session = boto3.session.Session(
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=settings.s3_secret_access_key or None,
            region_name=settings.s3_region,
        )
        config = _config(settings)
        self.client = session.client("s3", endpoint_url=settings.s3_endpoint_url or None, config=config)
        # Probes answer quickly or not at all: short timeouts, no retries (readiness must answer within its own).
        quick = config.merge(Config(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1}))
        self.prober = session.client("s3", endpoint_url=settings.s3_endpoint_url or None, config=quick)
        self._health = (True, float("-inf"))  # (answered, when: time.monotonic()) of the last operation or probe
        # Presigned URLs are for clients, which may reach the store under another name than the services do. Signing
        # is local: this client never connects.
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self.signer = session.client("s3", endpoint_url=public or None, config=config)
        self.where = f"bucket {self.bucket!r} at {settings.s3_endpoint_url or f'AWS S3 ({settings.s3_region})'}"

    def key(self, name: str) -> str:
        """The object key of a blob called `name` (such as images/<job id>/<blob id>.png)."""
        return f"{self.prefix}{name}"

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` at `key`, replacing what was there (S3 replaces an object whole, never half)."""
        with self._failure("store", key):
            self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, key, ExtraArgs={"ContentType": content_type}, Config=TRANSFER
            )

    def get(self, key: str) -> bytes:
        with self._failure("read", key):
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these objects; a key with no object is no error."""
        keys = list(keys)
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + DELETE_BATCH]]
            with self._failure("delete", batch[0]["Key"]):
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            for error in answer.get("Errors", []):
                log.warning("object store: could not delete %s: %s", error.get("Key"), error.get("Message"))

    def presigned_url(self, key: str, *, content_type: str, filename: str | None = None) -> str:
        """A URL that GETs the object without credentials for presign_ttl_s seconds, answering with `content_type`
        (and as an attachment named `filename`). Refused (StorageUnavailable) while the store is known to be down:
        a client sent there would meet the outage instead of a 503 that says when to try again."""
        if not self.reachable():
            raise StorageUnavailable(f"object store: {self.where} is not answering; no URL to it is handed out")
        params = {"Bucket": self.bucket, "Key": key, "ResponseContentType": content_type}
        if filename is not None:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.signer.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presign_ttl_s)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under the store's prefix followed by `prefix`."""
        names = []
        with self._failure("list", self.key(prefix)):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.key(prefix)
            ):
                names += [entry["Key"] for entry in page.get("Contents", [])]
        return names

    def reachable(self) -> bool:
        """Whether the bucket answers: what the last operation or probe found if under HEALTH_TTL_S old, else a HEAD of
        the bucket now (2 s at most)."""
        answered, when = self._health
        if time.monotonic() - when < HEALTH_TTL_S:
            return answered
        try:
            self.prober.head_bucket(Bucket=self.bucket)
            answered = True
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            log.warning("object store: %s does not answer: %s", self.where, exc)
            answered = False
        self._health = (answered, time.monotonic())
        return answered

    def ensure_bucket(self, wait_s: float = 0.0) -> bool:
        """Create the bucket unless it exists; True when it was created (`sepen-admin migrate` calls this). A server
        that does not answer is asked again for up to wait_s seconds (compose starts it beside the migration)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return False
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise StorageUnavailable(f"object store: cannot use {self.where}: {exc}") from exc
                break
            except botocore.exceptions.BotoCoreError as exc:
                if time.monotonic() >= deadline:
                    raise StorageUnavailable(f"object store: cannot reach {self.where}: {exc}") from exc
                time.sleep(1.0)
        where = {} if self.region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": self.region}}
        with self._failure("create", self.bucket):
            self.client.create_bucket(Bucket=self.bucket, **where)
        return True

    @contextmanager
    def _failure(self, action: str, key: str) -> Iterator[None]:
        """boto3's errors as StorageUnavailable, saying what failed where; a missing object as NotFound. Either way
        the store answered or not, which reachable() remembers."""
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                self._health = (True, time.monotonic())
                raise NotFound("stored object", key) from exc
            self._health = (False, time.monotonic())
            raise StorageUnavailable(f"object store: could not {action} {key!r} in {self.where}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            self._health = (False, time.monotonic())
            raise StorageUnavailable(f"object store: could not {action} {key!r} in {self.where}: {exc}") from exc
        self._health = (True, time.monotonic())

    def close(self) -> None:
        self.client.close()
        self.signer.close()
        self.prober.close()


def object_store_for(settings: Settings) -> ObjectStore | None:
    """The settings' bucket when SEPEN_BLOB_BACKEND is s3; None when blobs live in the database."""
    return ObjectStore(settings) if settings.blob_backend == "s3" else None
