"""Per-key request counters for the gateway's rate limit: fixed one-minute windows, counted in Redis so that every
gateway process shares them, or in this process's memory when there is no Redis broker (the embedded mode).

While Redis does not answer, the gateway counts in memory (each process its own window) and tries Redis again
after a few seconds: a broker outage must not take the API down, and jobs are still accepted then.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import redis.asyncio

logger = logging.getLogger(__name__)

WINDOW_S = 60
REDIS_RETRY_S = 5.0  # after a Redis failure, count in memory for this long before trying Redis again
REDIS_TIMEOUT_S = 0.5  # a rate-limit check must not hold a request up for long
KEY_PREFIX = "sepen:rate"


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int  # requests left in this window after this one
    reset_s: int  # seconds until the window ends and the count starts again


class MemoryCounter:
    """Counts per key and window in this process; forgets past windows."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._window = -1
        self._lock = threading.Lock()

    def incr(self, key: str, window: int) -> int:
        with self._lock:
            if window != self._window:
                self._counts, self._window = {}, window
            self._counts[key] = self._counts.get(key, 0) + 1
            return self._counts[key]


def shared_counter_url(broker_url: str) -> str | None:
    """The broker's URL when it is a Redis the gateway processes can share counters in; None: count in memory."""
    return broker_url if broker_url.startswith(("redis://", "rediss://", "unix://")) else None


class RateLimiter:
    """`hit(key)` counts one request of `key` and says whether it is within `limit_per_minute` (0 = no limit);
    `hit_async(key)` does the same from a coroutine, with an asyncio Redis client of the running event loop."""

    def __init__(self, limit_per_minute: int, redis_url: str | None = None, *, clock: Callable[[], float] = time.time):
        self.limit = limit_per_minute
        self.clock = clock
        self.memory = MemoryCounter()
        self.redis_url = redis_url if redis_url and limit_per_minute else None
        self.redis = (
            redis.Redis.from_url(self.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)
            if self.redis_url
            else None
        )
        self._async: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None
        self._redis_down_until = 0.0

    def hit(self, key: str) -> RateDecision | None:
        """None when there is no limit."""
        if not self.limit:
            return None
        now = self.clock()
        window = int(now // WINDOW_S)
        count = self._count_in_redis(key, window) if self._redis_up() else None
        return self._decide(key, window, now, count)

    async def hit_async(self, key: str) -> RateDecision | None:
        """hit() without blocking the event loop on Redis."""
        if not self.limit:
            return None
        now = self.clock()
        window = int(now // WINDOW_S)
        count = await self._count_in_redis_async(key, window) if self._redis_up() else None
        return self._decide(key, window, now, count)

    def _decide(self, key: str, window: int, now: float, count: int | None) -> RateDecision:
        if count is None:
            count = self.memory.incr(key, window)
        reset_s = max(1, int((window + 1) * WINDOW_S - now + 0.999))
        return RateDecision(count <= self.limit, self.limit, max(0, self.limit - count), reset_s)

    def _redis_up(self) -> bool:
        return self.redis_url is not None and time.monotonic() >= self._redis_down_until

    def _redis_failed(self, exc: Exception) -> None:
        logger.warning("rate limit: Redis unavailable (%s); counting in this process for %.0f s", exc, REDIS_RETRY_S)
        self._redis_down_until = time.monotonic() + REDIS_RETRY_S

    def _count_in_redis(self, key: str, window: int) -> int | None:
        name = f"{KEY_PREFIX}:{key}:{window}"
        try:
            count = self.redis.incr(name)
            if count == 1:  # the window's first request sets its expiry; the others need one command, not three
                self.redis.expire(name, WINDOW_S * 2)
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return None
        return int(count)

    async def _count_in_redis_async(self, key: str, window: int) -> int | None:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:  # a client serves the loop it was made in
            client = redis.asyncio.Redis.from_url(
                self.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
            )
            self._async = (loop, client)
        client = self._async[1]
        name = f"{KEY_PREFIX}:{key}:{window}"
        try:
            count = await client.incr(name)
            if count == 1:
                await client.expire(name, WINDOW_S * 2)
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return None
        return int(count)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
