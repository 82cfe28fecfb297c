"""The change feed: every process learns what another changed, within one second.

Every mutation in ``accounts`` writes an ``events`` row in its own transaction.
``ChangeWatcher`` polls ``SELECT ... FROM events WHERE id > ?`` every
``accounts.change_poll_s`` (default 0.25 s) and tells its subscribers, which drop what
they cached; so a revocation or a disable done by ``flintproxy admin`` in another
process reaches a running server well within one second. Changes made in this process
are published at once, after their commit, and not again by the poll.

On PostgreSQL the same transaction also sends a ``pg_notify`` (``store.postgres.
CHANNEL``); ``listen`` holds one dedicated connection that LISTENs and polls at once
on each notification (reconnecting when it drops), so another node's change lands
in milliseconds; the periodic poll stays as the backstop.

Out-of-order commits. On PostgreSQL several writers take event ids from one
sequence and may commit out of order (id 7 visible before id 6), and a rolled-back
transaction leaves a gap for ever. So the watcher remembers the ids it has seen
above ``floor`` (every id at or below it is dispatched) and re-reads from ``floor``;
a gap is given up after ``GAP_S`` (no transaction of ours stays open that long).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Protocol

import asyncpg

from flintproxy.store.db import Database

__all__ = ["ChangeFeed", "ChangeWatcher", "Subscriber"]

log = logging.getLogger("flintproxy.store.changes")

Subscriber = Callable[[str, int | None, int | None], None]

GAP_S = 5.0  # an id missing this long belongs to a rolled-back transaction
LISTEN_RETRY_S = 1.0


def _set_event(event: asyncio.Event, *_: object) -> None:
    event.set()


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

    def __init__(self, db: Database, poll_s: float, *, batch: int = 1000) -> None:
        self._db = db
        self.poll_s = poll_s
        self._batch = batch
        self._subscribers: list[Subscriber] = []
        self._seen: set[int] = set()  # ids above ``floor`` already dispatched
        self._gap_since: float | None = None  # when floor + 1 was first found missing
        self.floor = 0  # every event id <= floor has been dispatched
        self.last_id = 0  # the highest id dispatched
        self.notified = 0  # NOTIFYs received (diagnostics, tests)
        self._polling: asyncio.Lock | None = None

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)

    async def start(self) -> None:
        """Skip past existing events: nothing is cached yet, so they changed nothing."""
        top = int(await self._db.fetchval("SELECT COALESCE(MAX(id), 0) FROM events"))
        self.floor = max(self.floor, top)
        self.last_id = max(self.last_id, top)
        self._seen = {i for i in self._seen if i > self.floor}

    def publish(self, event_id: int, kind: str, account_id: int | None,
                key_id: int | None) -> None:
        """Dispatch a change committed by this process now; the poll will skip it."""
        if event_id > self.floor:
            self._seen.add(event_id)
        self._dispatch(kind, account_id, key_id)

    def _dispatch(self, kind: str, account_id: int | None, key_id: int | None) -> None:
        for callback in self._subscribers:
            try:
                callback(kind, account_id, key_id)
            except Exception:
                log.exception("change subscriber failed on %r", kind)

    async def poll_once(self) -> int:
        """Dispatch events above ``floor`` not yet seen; returns how many were new."""
        rows = await self._db.fetch(
            "SELECT id, kind, account_id, key_id FROM events WHERE id > ? ORDER BY id "
            "LIMIT ?", self.floor, self._batch)
        new = 0
        for event_id, kind, account_id, key_id in rows:
            if event_id in self._seen:
                continue
            self._seen.add(event_id)
            self.last_id = max(self.last_id, event_id)
            new += 1
            self._dispatch(kind, account_id, key_id)
        self._advance()
        return new

    def _advance(self) -> None:
        seen = self._seen
        while True:
            while self.floor + 1 in seen:
                self.floor += 1
                seen.discard(self.floor)
            if not seen:
                self._gap_since = None
                return
            # Ids above a hole: the hole is a transaction still committing, or one
            # rolled back (then it never fills).
            now = time.monotonic()
            if self._gap_since is None:
                self._gap_since = now
            if now - self._gap_since < GAP_S:
                return
            self.floor += 1
            self._gap_since = None

    async def poll(self) -> None:
        """Dispatch every new event, in batches (run periodically and on NOTIFY)."""
        if self._polling is None:
            self._polling = asyncio.Lock()
        async with self._polling:  # the periodic poll and a NOTIFY never interleave
            while await self.poll_once() >= self._batch:
                pass

    async def listen(self, dsn: str, channel: str) -> None:
        """LISTEN on ``channel`` on a dedicated connection; poll on every notification.

        Runs until cancelled (a task of the composition root); reconnects after a
        dropped connection, polling once on reconnect for what it missed meanwhile.
        """
        wake = asyncio.Event()

        def on_notify(con: object, pid: int, chan: str, payload: object) -> None:
            self.notified += 1
            wake.set()

        while True:
            con: asyncpg.Connection | None = None
            try:
                con = await asyncpg.connect(dsn, timeout=5.0)
                lost = asyncio.Event()
                con.add_termination_listener(functools.partial(_set_event, lost))
                await con.add_listener(channel, on_notify)
                wake.set()  # catch up on what happened while not listening
                while not lost.is_set():
                    waiter = asyncio.ensure_future(wake.wait())
                    stop = asyncio.ensure_future(lost.wait())
                    try:
                        await asyncio.wait([waiter, stop], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                        stop.cancel()
                    if wake.is_set():
                        wake.clear()
                        try:
                            await self.poll()
                        except Exception as exc:
                            log.warning("change feed poll after NOTIFY failed: %s",
                                        type(exc).__name__)
                log.warning("change feed: the LISTEN connection was lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The DSN may hold a password: name the error type, not the message.
                log.warning("change feed: LISTEN failed (%s); retrying in %.0f s",
                            type(exc).__name__, LISTEN_RETRY_S)
            finally:
                if con is not None and not con.is_closed():
                    con.terminate()
            await asyncio.sleep(LISTEN_RETRY_S)
