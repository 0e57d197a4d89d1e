"""The per-key request rate limit: counted once a key is authenticated, 429 with Retry-After past it, and stated on
every authenticated response in the headers RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset (seconds until
the window resets), as the IETF draft on rate-limit headers names them. The counters live in sepen_store."""

from __future__ import annotations

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sepen_store.auth import hash_key
from sepen_store.rate_limits import RateDecision, RateLimiter
from service.errors import ApiError

RATE_LIMIT_HEADERS = {
    "RateLimit-Limit": "requests allowed per API key in any one minute (a sliding window)",
    "RateLimit-Remaining": "requests that may be sent now",
    "RateLimit-Reset": "seconds until the whole limit is free again, if no request is sent meanwhile",
}
_STATE_KEY = "sepen_rate_limit"


def rate_limit_headers(decision: RateDecision) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(decision.limit),
        "RateLimit-Remaining": str(decision.remaining),
        "RateLimit-Reset": str(decision.reset_s),
    }


def enforce_rate_limit(request: Request, api_key: str) -> None:
    """Count this request against its key's limit; ApiError 429 (with Retry-After) when the key is past it."""
    limiter: RateLimiter = request.app.state.rate_limiter
    apply_decision(request, limiter.hit(hash_key(api_key)[:32]))  # the key's hash: the key itself is never kept


async def enforce_rate_limit_async(request: Request, api_key: str) -> None:
    """enforce_rate_limit() from a coroutine, without blocking the event loop on Redis."""
    limiter: RateLimiter = request.app.state.rate_limiter
    apply_decision(request, await limiter.hit_async(hash_key(api_key)[:32]))


def apply_decision(request: Request, decision: RateDecision | None) -> None:
    """Remember the decision for the response's headers; ApiError 429 when it refuses the request."""
    if decision is None:
        return
    request.scope.setdefault("state", {})[_STATE_KEY] = decision
    if not decision.allowed:
        raise ApiError(
            429,
            "rate_limited",
            f"this API key sent more than {decision.limit} requests in a minute; "
            f"wait {decision.retry_after_s} s (Retry-After) and slow down",
            headers={**rate_limit_headers(decision), "Retry-After": str(decision.retry_after_s)},
        )


class RateLimitHeaders:
    """Adds the rate-limit headers to the response of a request that was counted, whatever its status."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            decision = state.get(_STATE_KEY)
            if message["type"] == "http.response.start" and decision is not None:
                # Raw header pairs, not MutableHeaders: this runs on every authenticated answer.
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                ours = [(name.lower().encode(), value.encode()) for name, value in rate_limit_headers(decision).items()]
                message["headers"] = headers + [pair for pair in ours if pair[0] not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)
