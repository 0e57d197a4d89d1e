"""The exception tree of sepen_store; the gateway maps each to an HTTP status, and each declares its error `code`.

StoreError
├── NotFound            a job, adapter, version, model or key does not exist for this tenant (404)
├── Conflict            the request contradicts stored state (409)
│   └── IllegalTransition   a job cannot move from its status to the one asked for
├── Unauthorized        missing, unknown or revoked API key (401)
├── QuotaExceeded       a tenant is at a cap: queued jobs, or compute seconds today (429)
├── StorageUnavailable  the object store holding blobs did not answer or is overloaded (503)
└── StorageRefused      the object store answered with a refusal (a 4xx: credentials, permissions, no such bucket):
                        the service's settings need fixing, waiting does not help (500, logged)
"""


class StoreError(Exception):
    """Base class of sepen_store errors."""

    code = "store_error"


class NotFound(StoreError):
    def __init__(self, kind: str, name: str):
        super().__init__(f"{kind} {name!r} not found")
        self.kind = kind
        self.name = name

    @property
    def code(self) -> str:  # type: ignore[override]
        """'job_not_found', 'adapter_version_not_found'...: the kind, then '_not_found'."""
        return f"{self.kind.replace(' ', '_')}_not_found"


class Conflict(StoreError):
    """The request is valid but contradicts what is stored."""

    code = "conflict"


class IllegalTransition(Conflict):
    code = "illegal_transition"

    def __init__(self, job_id: str, current: str, wanted: str):
        super().__init__(f"job {job_id} is {current}; it cannot become {wanted}")
        self.current = current
        self.wanted = wanted


class Unauthorized(StoreError):
    code = "unauthorized"


class QuotaExceeded(StoreError):
    """A tenant may not queue another job now: `code` names the cap, `retry_after_s` when to try again."""

    def __init__(self, code: str, message: str, retry_after_s: int):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class StorageUnavailable(StoreError):
    """The object store holding blobs (SEPEN_BLOB_BACKEND=s3) did not answer, timed out, or answered that it is
    overloaded or failing (5xx, SlowDown): an outage, worth waiting out. The message says what failed where."""

    code = "storage_unavailable"


class StorageRefused(StoreError):
    """The object store answered with a permanent refusal (a 4xx such as AccessDenied, InvalidAccessKeyId or
    NoSuchBucket, or no credentials at all): not an outage, so nothing waits for it; the message says what was
    refused where and which settings to check."""

    code = "storage_refused"
