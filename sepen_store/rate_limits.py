"""Per-key request counters for the gateway's rate limit: a sliding one-minute window, counted in Redis so that every
gateway process shares it, or in this process's memory when there is no Redis broker (the embedded mode).

The window slides by weighing two fixed one-minute counters: a request at fraction f of minute m is allowed while
count(m) + count(m - 1) * (1 - f) stays within the limit, the previous minute's requests taken as spread evenly
over it. So a burst at the end of one minute is still counted at the start of the next: no window edge lets twice
the limit through (a fixed window let 1,200 of 600 per minute through in 12 s across an edge).

While Redis does not answer, the gateway counts in memory (each process its own window) and tries Redis again
after a few seconds: a broker outage must not take the API down, and jobs are still accepted then.
"""

from __future__ import annotations

import asyncio
import logging
import math
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
    remaining: int  # requests left now, after this one
    reset_s: int  # seconds until the whole limit is free again, if no request is sent meanwhile
    retry_after_s: int  # seconds until one more request fits, if none is sent meanwhile (at least 1)


class MemoryCounter:
    """Counts per key of this minute and the one before, in this process; forgets older minutes."""

    def __init__(self) -> None:
        self._counts: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()

    def decr(self, key: str, window: int) -> None:
        with self._lock:
            counts = self._counts.get(window, {})
            if counts.get(key):
                counts[key] -= 1

    def incr(self, key: str, window: int) -> tuple[int, int]:
        """(this window's count after this request, the previous window's count)."""
        with self._lock:
            self._counts = {w: c for w, c in self._counts.items() if w >= window - 1}
            counts = self._counts.setdefault(window, {})
            counts[key] = counts.get(key, 0) + 1
            return counts[key], self._counts.get(window - 1, {}).get(key, 0)


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
        counts = self._count_in_redis(key, window) if self._redis_up() else None
        decision = self._decide(key, window, now, counts)
        if not decision.allowed:  # only what was let through counts, or a client just over the limit gets nothing
            try:
                self.redis.decr(_counter(key, window)) if counts is not None else self.memory.decr(key, window)
            except redis.RedisError as exc:
                self._redis_failed(exc)
        return decision

    async def hit_async(self, key: str) -> RateDecision | None:
        """hit() without blocking the event loop on Redis."""
        if not self.limit:
            return None
        now = self.clock()
        window = int(now // WINDOW_S)
        counts = await self._count_in_redis_async(key, window) if self._redis_up() else None
        decision = self._decide(key, window, now, counts)
        if not decision.allowed:  # only what was let through counts (see hit)
            try:
                if counts is not None:
                    await self._async[1].decr(_counter(key, window))
                else:
                    self.memory.decr(key, window)
            except redis.RedisError as exc:
                self._redis_failed(exc)
        return decision

    def _decide(self, key: str, window: int, now: float, counts: tuple[int, int] | None) -> RateDecision:
        current, previous = counts if counts is not None else self.memory.incr(key, window)
        elapsed = now / WINDOW_S - window  # fraction of this window gone by
        used = current + previous * (1 - elapsed)
        # Nothing weighs any more once this window and the next have passed (or this one, if it saw nothing).
        reset_s = math.ceil(((1 - elapsed) + (1 if current else 0)) * WINDOW_S)
        retry_after_s = max(1, math.ceil(self._wait_for_room(current, previous, elapsed) * WINDOW_S))
        remaining = max(0, math.floor(self.limit - used))
        return RateDecision(used <= self.limit, self.limit, remaining, reset_s, retry_after_s)

    def _wait_for_room(self, current: int, previous: int, elapsed: float) -> float:
        """Windows (fractions of one) until one more request fits, if none is sent meanwhile."""
        room = self.limit - 1 - current  # what the previous window's weighted share must fall to, in this window
        if room >= 0:
            return 0.0 if previous <= room else max(0.0, 1 - room / previous - elapsed)
        # Not in this window: in the next, this window's count is the weighted one.
        return 1 - elapsed + max(0.0, 1 - (self.limit - 1) / current)

    def _redis_up(self) -> bool:
        return self.redis_url is not None and time.monotonic() >= self._redis_down_until

    def _redis_failed(self, exc: Exception) -> None:
        logger.warning("rate limit: Redis unavailable (%s); counting in this process for %.0f s", exc, REDIS_RETRY_S)
        self._redis_down_until = time.monotonic() + REDIS_RETRY_S

    def _count_in_redis(self, key: str, window: int) -> tuple[int, int] | None:
        """(this window's count after this request, the previous window's), in one round trip."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                current, _, previous = _counting(pipe, key, window).execute()
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return None
        return int(current), int(previous or 0)

    async def _count_in_redis_async(self, key: str, window: int) -> tuple[int, int] | None:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:  # a client serves the loop it was made in
            client = redis.asyncio.Redis.from_url(
                self.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
            )
            self._async = (loop, client)
        client = self._async[1]
        try:
            async with client.pipeline(transaction=False) as pipe:
                current, _, previous = await _counting(pipe, key, window).execute()
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return None
        return int(current), int(previous or 0)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()


def _counter(key: str, window: int) -> str:
    return f"{KEY_PREFIX}:{key}:{window}"


def _counting(pipe, key: str, window: int):
    """Queue on a pipeline: count one request in this window's counter (kept two windows), read the previous one's."""
    name = f"{KEY_PREFIX}:{key}:{window}"
    return pipe.incr(name).expire(name, WINDOW_S * 2).get(f"{KEY_PREFIX}:{key}:{window - 1}")
