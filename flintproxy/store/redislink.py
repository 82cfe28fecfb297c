"""Redis, the shared limiter state: the one module that imports redis-py.

Why one boundary: every Redis failure (refused, reset, timed out, a script error)
becomes ``errors.SharedStateDown`` here, so the limiter decides what a client sees
(a 503 or per-node limits) without knowing redis-py's exception tree, and nothing
else can log a URL with a password in it.

Why a pipeline of our own: a redis-py command per admission cost about 100-170 µs of
CPU here (pool checkout, a write and a read wait per command): 2.3x the embedded
mode's whole request (bench (e)). Calls are queued instead and ``pipeline`` (the one
sender task, owned by the composition root) writes every queued call in one packet
and reads the replies in order on one connection: while a batch is in flight the
next one gathers, so under load one round trip carries many admissions and the
per-call cost is packing and parsing, both in C (hiredis). One connection, one
batch in flight: Redis runs a script in microseconds, the wire is the wait.

What it keeps:
    round_trips   request/reply exchanges with Redis (a batch, a PING, a script
                  load): ``flintproxy_redis_round_trips_total``; ``calls`` counts the
                  commands those carried
    up            False from the first failure until a PING answers again; while
                  down, calls fail at once (no connect attempt, no timeout per
                  request) and ``reconnect`` (a job of the composition root) retries
                  with exponential backoff, 50 ms doubling to 5 s

Scripts go by EVALSHA; one Redis does not know (a restart, SCRIPT FLUSH) is loaded
and its calls sent again (one more round trip, counted). Nothing retries a failed
batch: an admission must fail within ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from flintproxy.config import ClusterConfig, redact_url
from flintproxy.errors import SharedStateDown

__all__ = ["Arg", "Orphan", "RedisLink", "Script"]

log = logging.getLogger("flintproxy.redis")

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
POOL_SIZE = 4  # the pipeline's connection, PINGs, script loads

Arg = str | bytes | int | float
# Told of the reply of a call whose caller was cancelled meanwhile (what it took
# must be given back).
Orphan = Callable[[object], None]


class Script:
    """A Lua script and its SHA-1 (what EVALSHA names it by)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's name


class _Call:
    __slots__ = ("command", "future", "orphan", "script")

    def __init__(self, script: Script, command: tuple[Arg, ...],
                 future: asyncio.Future[object], orphan: Orphan | None) -> None:
        self.script = script
        self.command = command
        self.future = future
        self.orphan = orphan


class RedisLink:
    """One process's link to Redis; see the module docstring."""

    def __init__(self, cfg: ClusterConfig) -> None:
        assert cfg.redis_url is not None
        self.where = redact_url(cfg.redis_url)  # for messages: never the password
        self._timeout = cfg.redis_timeout_s
        self._pool = aioredis.BlockingConnectionPool.from_url(
            cfg.redis_url, max_connections=POOL_SIZE, timeout=cfg.redis_timeout_s,
            socket_timeout=cfg.redis_timeout_s, socket_connect_timeout=cfg.redis_timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._client = aioredis.Redis.from_pool(self._pool)  # owns it: aclose closes it
        self._conn: Connection | None = None
        self._queue: list[_Call] = []
        self._wake = asyncio.Event()
        self.round_trips = 0
        self.calls = 0
        self.failures = 0
        self.up = True
        self.last_error: str | None = None
        self._backoff = BACKOFF_MIN_S
        self._next_try = 0.0

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg],
                  orphan: Orphan | None = None) -> object:
        """EVALSHA ``script`` in the next batch; its reply, or SharedStateDown (at once
        while down). ``orphan`` gets the reply if this call is cancelled meanwhile."""
        if not self.up:
            raise SharedStateDown(f"Redis at {self.where} is unreachable")
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(script, ("EVALSHA", script.sha, len(keys), *keys, *args),
                                 future, orphan))
        self._wake.set()
        return await future

    async def run_now(self, script: Script, keys: Sequence[Arg],
                      args: Sequence[Arg]) -> object:
        """``run`` in a round trip of its own, without the sender task: at shutdown,
        after the root's tasks ended."""
        if not self.up:
            raise SharedStateDown(f"Redis at {self.where} is unreachable")
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        await self._send([_Call(script, ("EVALSHA", script.sha, len(keys), *keys, *args),
                                future, None)])
        if not future.done():  # a script Redis lost: loaded, queued again
            batch, self._queue = self._queue, []
            await self._send(batch)
        return future.result()

    async def pipeline(self) -> None:
        """The sender: forever, every queued call in one round trip (a root task)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if batch:
                await self._send(batch)

    async def _send(self, batch: list[_Call]) -> None:
        self.round_trips += 1
        self.calls += len(batch)
        try:
            if self._conn is None:  # connecting has its own deadline (socket_connect_timeout)
                self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            async with asyncio.timeout(self._timeout):
                replies = await self._exchange(self._conn, [c.command for c in batch])
        except (RedisError, OSError, TimeoutError) as exc:
            err = self._down(exc)
            await self._drop_connection()
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(err)
            return
        unknown: list[_Call] = []
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                unknown.append(call)
            elif isinstance(reply, Exception):
                if not call.future.done():
                    call.future.set_exception(self._down(reply))
            elif not call.future.done():
                call.future.set_result(reply)
            elif call.orphan is not None:
                call.orphan(reply)
        if unknown:
            await self._load([c.script for c in unknown], unknown)

    @staticmethod
    async def _exchange(conn: Connection, commands: list[tuple[Arg, ...]]) -> list[object]:
        # hiredis packs in C: 2 µs a call where redis-py's Python packer took 9.5.
        packed = b"".join([hiredis.pack_command(c) for c in commands])  # type: ignore[arg-type]
        await conn.send_packed_command(packed, check_health=False)
        replies: list[object] = []
        for _ in commands:
            try:
                # inf: no timeout context per reply; the batch has one (_send).
                replies.append(await conn.read_response(timeout=math.inf))
            except ResponseError as exc:  # this call's error; the others stand
                replies.append(exc)
        return replies

    async def _load(self, scripts: list[Script], calls: list[_Call]) -> None:
        """SCRIPT LOAD what Redis lost, then send those calls again."""
        self.round_trips += 1
        try:
            for source in {s.source for s in scripts}:
                await self._client.script_load(source)
        except (RedisError, OSError, TimeoutError) as exc:
            err = self._down(exc)
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(err)
            return
        self._queue[:0] = calls
        self._wake.set()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()
            await self._pool.release(conn)

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
        """After the pipeline task ended: fail what is still queued, close the pool."""
        err = SharedStateDown(f"Redis link to {self.where} closed")
        queued, self._queue = self._queue, []
        for call in queued:
            if not call.future.done():
                call.future.set_exception(err)
        await self._drop_connection()
        await self._client.aclose()
