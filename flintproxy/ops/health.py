"""Readiness: GET /readyz answers 200 when the gateway can serve and bill, else 503.

Checks, each reported with detail in the JSON body:
    database      the SQLite file is writable: ``BEGIN IMMEDIATE``, a write that touches
                  no row, ``ROLLBACK``, on a connection of its own, at most once per
                  ``PROBE_TTL_S`` (never a disk write per request); a database locked
                  by another writer counts as writable. On PostgreSQL: a pooled
                  connection answers and the server is a primary (not in recovery)
    usage_writer  UsageWriter.ready(): its task runs, its flushes succeed, its backlog
                  is under the bound
    upstreams     at least one upstream can be tried (circuit closed, or its cooldown over)
    rate_limiter  with [cluster] redis_url only: Redis answers; while it does not, ok
                  under on_redis_down = "open" (per-node limits, "degraded") and not
                  ok under "closed" (every /v1 request is refused with 503)
/healthz (liveness) answers while the event loop runs. Both are data-plane routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from flintproxy.config import RedisDown
from flintproxy.gate.sharedlimits import SharedLimiter
from flintproxy.http.exchange import Exchange, Responder
from flintproxy.relay.routing import Router
from flintproxy.store import sqlite
from flintproxy.store.db import PgDatabase
from flintproxy.store.ledger import UsageWriter

PROBE_TTL_S = 1.0
PROBE_TIMEOUT_S = 2.0
PROBE_BUSY_MS = 200


class DbProbe:
    """Is the database writable? Cached; one probe in flight at a time."""

    def __init__(self, db: aiosqlite.Connection | PgDatabase, ttl_s: float = PROBE_TTL_S,
                 timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self._db = db
        self._ttl = ttl_s
        self._timeout = timeout_s
        self._at = -ttl_s
        self._last: tuple[bool, str] = (False, "not probed yet")
        self._task: asyncio.Task[tuple[bool, str]] | None = None

    async def check(self) -> tuple[bool, str]:
        if time.monotonic() - self._at < self._ttl:
            return self._last
        task = self._task
        if task is None or task.done():
            # A task of its own: a caller that times out or goes away never cuts the
            # probe between BEGIN and ROLLBACK.
            task = self._task = asyncio.get_running_loop().create_task(self._probe())
        try:
            self._last = await asyncio.wait_for(asyncio.shield(task), self._timeout)
        except TimeoutError:
            self._last = (False, f"no answer within {self._timeout:g} s (disk hung?)")
        self._at = time.monotonic()
        return self._last

    async def _probe(self) -> tuple[bool, str]:
        db = self._db
        if isinstance(db, PgDatabase):
            try:
                primary = await db.fetchval("SELECT NOT pg_is_in_recovery()")
            except Exception as exc:
                return False, type(exc).__name__  # its message may name the server
            return (True, "writable") if primary else (False, "read-only (in recovery)")
        try:
            await db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return True, "busy: another connection is writing"
            return False, f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        try:
            await db.execute("DELETE FROM schema_version WHERE 0")
            return True, "writable"
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), self._timeout)


class Readiness:
    """The checks behind /readyz."""

    def __init__(self, probe: DbProbe, router: Router, usage: UsageWriter,
                 limits: SharedLimiter | None = None) -> None:
        self.probe = probe
        self.router = router
        self.usage = usage
        self.limits = limits

    async def check(self) -> tuple[bool, dict[str, Any]]:
        db_ok, db_detail = await self.probe.check()
        usage = self.usage
        writer = {"ok": usage.ready(), "stalled": usage.stalled, "backlog": usage.backlog,
                  "max_backlog": usage.max_backlog_rows, "last_error": usage.last_error}
        now = self.router.clock()
        ups = {u.name: u.available(now) for u in self.router.upstreams}
        checks: dict[str, Any] = {
            "database": {"ok": db_ok, "detail": db_detail},
            "usage_writer": writer,
            "upstreams": {"ok": any(ups.values()),
                          "available": sorted(n for n, ok in ups.items() if ok),
                          "unavailable": sorted(n for n, ok in ups.items() if not ok)},
        }
        if self.limits is not None:
            checks["rate_limiter"] = _limiter_check(self.limits)
        return all(c["ok"] for c in checks.values()), checks


def _limiter_check(limits: SharedLimiter) -> dict[str, Any]:
    link = limits.link
    if link.up:
        return {"ok": True, "mode": "shared", "redis": "up"}
    fail_open = limits.policy is RedisDown.OPEN
    return {"ok": fail_open, "redis": "down", "last_error": link.last_error,
            "mode": "per-node (fail-open, degraded)" if fail_open
            else "unavailable (fail-closed: /v1 answers 503)"}


JSON_HEAD = b"Content-Type: application/json\r\n"
HEALTHY = orjson.dumps({"status": "ok"})


async def healthz(exchange: Exchange, out: Responder) -> None:
    """Liveness: 200 while the event loop runs."""
    out.respond(200, JSON_HEAD, HEALTHY)


class ReadyEndpoint:
    """GET /readyz on the data plane."""

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness

    async def __call__(self, exchange: Exchange, out: Responder) -> None:
        """200 with ``{"ready": true, "checks": {...}}``, or 503 with the failing check."""
        ready, checks = await self.readiness.check()
        out.respond(200 if ready else 503, JSON_HEAD,
                    orjson.dumps({"ready": ready, "checks": checks}))


async def open_probe_db(path: Path) -> aiosqlite.Connection:
    db = await sqlite.connect(path)
    # Short: a lock held by the usage writer means "writable", not "wait for it".
    await db.execute(f"PRAGMA busy_timeout={PROBE_BUSY_MS}")
    return db
