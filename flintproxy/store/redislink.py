"""Redis, the shared limiter state: the one module that imports redis-py.

Why one boundary: every Redis failure (refused, reset, timed out, a script error)
becomes ``errors.SharedStateDown`` here, so the limiter decides what a client sees
(a 503 or per-node limits) without knowing redis-py's exception tree, and nothing
else can log a URL with a password in it.

What it keeps:
    round_trips   every request/reply exchange with Redis (a script, a pipeline, a
                  PING, a script (re)load): the gateway's own count behind
                  ``flintproxy_redis_round_trips_total``, for the "≤ 1 + ε per
                  request" budget (bench/run.py compares it with INFO commandstats)
    up            False from the first failure until a PING answers again; while
                  down, calls fail at once (no connect attempt, no timeout per
                  request) and ``reconnect`` (a job of the composition root) retries
                  with exponential backoff, 50 ms doubling to 5 s

Scripts go by EVALSHA; a script Redis does not know (a restart, SCRIPT FLUSH) is
loaded once and the call retried (one extra round trip, counted).
Calls never retry on their own: an admission must fail within ``timeout_s``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from flintproxy.config import ClusterConfig, redact_url
from flintproxy.errors import SharedStateDown

__all__ = ["Arg", "RedisLink", "Script"]

log = logging.getLogger("flintproxy.redis")

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
# Connections per process: admissions in flight beyond this wait for one (within
# timeout_s). Redis answers a script in microseconds, so a few carry thousands/s.
POOL_SIZE = 32

Arg = str | bytes | int | float


class Script:
    """A Lua script and its SHA-1 (what EVALSHA names it by)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's name


class RedisLink:
    """One process's connection pool to Redis; see the module docstring."""

    def __init__(self, cfg: ClusterConfig) -> None:
        assert cfg.redis_url is not None
        self.where = redact_url(cfg.redis_url)  # for messages: never the password
        self._timeout = cfg.redis_timeout_s
        pool = aioredis.BlockingConnectionPool.from_url(
            cfg.redis_url, max_connections=POOL_SIZE, timeout=cfg.redis_timeout_s,
            socket_timeout=cfg.redis_timeout_s, socket_connect_timeout=cfg.redis_timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._client = aioredis.Redis.from_pool(pool)  # owns it: aclose closes it
        self.round_trips = 0
        self.failures = 0
        self.up = True
        self.last_error: str | None = None
        self._backoff = BACKOFF_MIN_S
        self._next_try = 0.0

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> object:
        """EVALSHA ``script``; its reply, or SharedStateDown (fast while down)."""
        if not self.up:
            raise SharedStateDown(f"Redis at {self.where} is unreachable")
        self.round_trips += 1
        client = self._client
        try:
            try:
                return await client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                self.round_trips += 1
                return await client.eval(script.source, len(keys), *keys, *args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._down(exc) from None

    async def ping(self) -> None:
        self.round_trips += 1
        try:
            await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._down(exc) from None

    async def reconnect(self) -> None:
        """While down: a PING once the backoff has passed; up again when it answers."""
        if self.up or time.monotonic() < self._next_try:
            return
        self.round_trips += 1
        try:
            await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            self.last_error = type(exc).__name__
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            self._next_try = time.monotonic() + self._backoff
            return
        log.warning("Redis at %s is reachable again: shared limits resume", self.where)
        self.up = True
        self.last_error = None
        self._backoff = BACKOFF_MIN_S

    def _down(self, exc: BaseException) -> SharedStateDown:
        self.failures += 1
        self.last_error = type(exc).__name__
        if self.up:
            # The exception's kind only: its text may quote a URL or a value.
            log.error("Redis at %s failed (%s): limits follow [cluster] on_redis_down",
                      self.where, type(exc).__name__)
            self.up = False
            self._backoff = BACKOFF_MIN_S
            self._next_try = time.monotonic() + self._backoff
        return SharedStateDown(f"Redis at {self.where} failed: {type(exc).__name__}")

    async def close(self) -> None:
        await self._client.aclose()
