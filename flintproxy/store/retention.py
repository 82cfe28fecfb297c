"""Retention (CONTRACT promise 7): usage rows of a deleted account are kept
``billing.retention_days`` (90) after its deletion, then purged, in chunks so that no
transaction holds the write lock for long. The composition root runs ``RetentionJob``
at start-up and every hour; ``flintproxy admin purge`` runs it on demand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flintproxy.store import sqlite
from flintproxy.store.db import Queries

__all__ = ["DAY_MS", "RetentionJob", "purge"]

log = logging.getLogger("flintproxy.store.retention")

PURGE_CHUNK = 5000
DAY_MS = 86_400_000


async def purge(db: Queries, retention_days: int, now_ms: int) -> int:
    """Delete usage rows of accounts deleted at least ``retention_days`` ago; returns rows.

    Deletes in chunks (separate short transactions) so the writer is never blocked
    for long. ``accounts.charged_nano`` is left as it is.
    """
    cutoff = now_ms - retention_days * DAY_MS
    total = 0
    while True:
        n = await db.execute(
            "DELETE FROM usage WHERE id IN (SELECT u.id FROM accounts a "
            "JOIN usage u ON u.account_id = a.id WHERE a.status = 'deleted' "
            "AND a.deleted_at <= ? LIMIT ?)", cutoff, PURGE_CHUNK)
        total += n
        if n < PURGE_CHUNK:
            return total


INTERVAL_S = 3600.0  # how often the composition root runs it


class RetentionJob:
    """``purge`` with the configured retention; the clock is injectable (tests)."""

    def __init__(self, db: Queries, retention_days: int, *,
                 clock: Callable[[], int] = sqlite.now_ms) -> None:
        self.db = db
        self.retention_days = retention_days
        self.clock = clock
        self.purged = 0

    async def run_once(self) -> int:
        n = await purge(self.db, self.retention_days, self.clock())
        self.purged += n
        if n:
            log.info("retention: purged %d usage rows of accounts deleted more than %d days ago",
                     n, self.retention_days)
        return n

