"""An S3-compatible bucket holding the bytes of blobs (SEPEN_BLOB_BACKEND=s3): AWS S3, or a server of one's own such as
SeaweedFS or MinIO. sepen_store.blobs decides what goes where; this module only moves bytes and signs URLs.

What fails is told apart: a store that does not answer, times out or answers that it is failing or overloaded (5xx,
SlowDown, throttling) is an outage (StorageUnavailable, waited out); one that answers with a refusal (any other 4xx:
AccessDenied, InvalidAccessKeyId, NoSuchBucket..., or no credentials) is a problem of the settings (StorageRefused,
raised at once: waiting would not mend it)."""

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

from sepen_store.errors import NotFound, StorageRefused, StorageUnavailable
from sepen_store.settings import Settings

log = logging.getLogger(__name__)

# Parts of 64 MiB above 64 MiB: a checkpoint of hundreds of MB goes up in a few parts, each retried on its own, and
# the 5 GB limit of a single PUT never applies.
TRANSFER = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=4)
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
# How long what the last operation or probe said of the store is believed: a busy gateway probes at most this often.
HEALTH_TTL_S = 5.0
# Error codes of answers that say the store is busy or failing for now, whatever their HTTP status.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
    }
)
SETTINGS_HINT = "check the object store's settings (SEPEN_S3_*: endpoint, bucket, credentials and their permissions)"


def is_outage(exc: Exception) -> bool:
    """Whether a boto3 error means the store is away or overloaded (worth waiting out) rather than refusing: no
    connection, a timeout, a connection cut mid-answer, a 5xx or 429, or a code of TRANSIENT_CODES."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
        code = str(error.get("Code", ""))
        status = meta.get("HTTPStatusCode") or (int(code) if code.isdigit() else 0)
        return status >= 500 or status == 429 or code in TRANSIENT_CODES
    return isinstance(
        exc,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.IncompleteReadError,
    )


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
        # (what the store last said, when: time.monotonic()) of the last operation or probe: True (it answered), False
        # (an outage), or the message of its refusal.
        self._health: tuple[bool | str, float] = (True, float("-inf"))
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
        """Whether the bucket answers (False: an outage): what the last operation or probe found if under HEALTH_TTL_S
        old, else a HEAD of the bucket now (2 s at most). A bucket that answers with a refusal (a 4xx: credentials,
        permissions, no such bucket) raises StorageRefused: not an outage to wait out, but settings to fix."""
        said, when = self._health
        if time.monotonic() - when >= HEALTH_TTL_S:
            try:
                self.prober.head_bucket(Bucket=self.bucket)
                said = True
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                if is_outage(exc):
                    log.warning("object store: %s does not answer: %s", self.where, exc)
                    said = False
                else:
                    said = f"object store: {self.where} refuses access to the bucket: {exc}; {SETTINGS_HINT}"
                    log.error("%s", said)
            self._health = (said, time.monotonic())
        if isinstance(said, str):
            raise StorageRefused(said)
        return said

    def ensure_bucket(self, wait_s: float = 0.0) -> bool:
        """Create the bucket unless it exists; True when it was created (`sepen-admin migrate` calls this). A server
        that does not answer is asked again for up to wait_s seconds (compose starts it beside the migration)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return False
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                code = exc.response.get("Error", {}).get("Code") if hasattr(exc, "response") else None
                if code in ("404", "NoSuchBucket", "NotFound"):
                    break
                if not is_outage(exc):
                    raise StorageRefused(f"object store: cannot use {self.where}: {exc}; {SETTINGS_HINT}") from exc
                if time.monotonic() >= deadline:
                    raise StorageUnavailable(f"object store: cannot reach {self.where}: {exc}") from exc
                time.sleep(1.0)
        where = {} if self.region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": self.region}}
        with self._failure("create", self.bucket):
            self.client.create_bucket(Bucket=self.bucket, **where)
        return True

    @contextmanager
    def _failure(self, action: str, key: str) -> Iterator[None]:
        """boto3's errors saying what failed where: a missing object as NotFound, an outage as StorageUnavailable, a
        refusal as StorageRefused. Whether the store answered or not, reachable() remembers."""
        try:
            yield
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            code = exc.response.get("Error", {}).get("Code") if hasattr(exc, "response") else None
            if code in ("NoSuchKey", "404"):
                self._health = (True, time.monotonic())
                raise NotFound("stored object", key) from exc
            if is_outage(exc):
                self._health = (False, time.monotonic())
                raise StorageUnavailable(f"object store: could not {action} {key!r} in {self.where}: {exc}") from exc
            # A refusal says nothing of whether the store is up: reachable() keeps what it knew, or asks the bucket.
            raise StorageRefused(
                f"object store: {self.where} refused to {action} {key!r}: {exc}; {SETTINGS_HINT}"
            ) from exc
        self._health = (True, time.monotonic())

    def close(self) -> None:
        self.client.close()
        self.signer.close()
        self.prober.close()


def object_store_for(settings: Settings) -> ObjectStore | None:
    """The settings' bucket when SEPEN_BLOB_BACKEND is s3; None when blobs live in the database."""
    return ObjectStore(settings) if settings.blob_backend == "s3" else None
