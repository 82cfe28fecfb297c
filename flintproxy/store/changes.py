"""The change feed: every process learns what another changed, within one second.

Every mutation in ``accounts`` writes an ``events`` row in its own transaction.
``ChangeWatcher`` polls ``SELECT ... FROM events WHERE id > ?`` every
``accounts.change_poll_s`` (default 0.25 s) and tells its subscribers, which drop what
they cached; so a revocation or a disable done by ``flintproxy admin`` in another
process reaches a running server well within one second. Changes made in this process
are published at once, after their commit, and not again by the poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import aiosqlite

__all__ = ["ChangeFeed", "ChangeWatcher", "Subscriber"]

log = logging.getLogger("flintproxy.store.changes")

Subscriber = Callable[[str, int | None, int | None], None]


class ChangeFeed(Protocol):
    """The seam a shared-store backend implements: tell subscribers of every change."""

    def subscribe(self, callback: Subscriber) -> None: ...

    def publish(self, event_id: int, kind: str, account_id: int | None,
                key_id: int | None) -> None: ...


class ChangeWatcher:
    """Polls the ``events`` table and calls subscribers; see the module docstring.

    Subscribers are plain callables ``(kind, account_id, key_id) -> None`` run on the
    event loop; they must be quick and idempotent (reload, don't add).
    """

    def __init__(self, db: aiosqlite.Connection, poll_s: float, *, batch: int = 1000,
                 lock: asyncio.Lock | None = None) -> None:
        self._db = db
        # The connection's transaction lock (Accounts.lock): a poll must never run
        # inside an open transaction, where it could see an event row that is then
        # rolled back and its id reused.
        self._lock = lock or asyncio.Lock()
        self.poll_s = poll_s
        self._batch = batch
        self._subscribers: list[Subscriber] = []
        self._published: set[int] = set()
        self.last_id = 0

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)

    async def start(self) -> None:
        """Skip past existing events: nothing is cached yet, so they changed nothing."""
        async with self._lock, self._db.execute("SELECT COALESCE(MAX(id), 0) FROM events") as cur:
            row = await cur.fetchone()
        self.last_id = int(row[0]) if row else 0
        self._published = {i for i in self._published if i > self.last_id}

    def publish(self, event_id: int, kind: str, account_id: int | None,
                key_id: int | None) -> None:
        """Dispatch a change committed by this process now; the poll will skip it."""
        if event_id > self.last_id:
            self._published.add(event_id)
        self._dispatch(kind, account_id, key_id)

    def _dispatch(self, kind: str, account_id: int | None, key_id: int | None) -> None:
        for callback in self._subscribers:
            try:
                callback(kind, account_id, key_id)
            except Exception:
                log.exception("change subscriber failed on %r", kind)

    async def poll_once(self) -> int:
        """Dispatch events newer than ``last_id``; returns how many were read."""
        async with self._lock, self._db.execute(
                "SELECT id, kind, account_id, key_id FROM events WHERE id > ? ORDER BY id "
                "LIMIT ?", (self.last_id, self._batch)) as cur:
            rows = list(await cur.fetchall())
        for event_id, kind, account_id, key_id in rows:
            self.last_id = event_id
            if event_id in self._published:
                self._published.discard(event_id)
                continue
            self._dispatch(kind, account_id, key_id)
        return len(rows)

    async def poll(self) -> None:
        """Dispatch every event newer than ``last_id``, in batches (run periodically)."""
        while await self.poll_once() >= self._batch:
            pass
