"""Retention (CONTRACT promise 7): usage rows of a deleted account are kept
``billing.retention_days`` (90) after its deletion, then purged, in chunks so that no
transaction holds the write lock for long. The composition root runs ``RetentionJob``
at start-up and every hour; ``flintproxy admin purge`` runs it on demand.

The same job prunes ``key_spend``, which gains two rows per used key per day: a UTC
day's row is dropped ``SPEND_DAYS_KEPT`` days after it, a month's after
``SPEND_MONTHS_KEPT`` months (caps only ever read the current day and month), never a
row a cap lease still refers to (one fully spent holds nothing, but its
row must stay until the lease is closed or swept).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flintproxy.store import sqlite
from flintproxy.store.caps import periods
from flintproxy.store.db import Database
from flintproxy.store.entries import erase_usage

__all__ = ["DAY_MS", "RetentionJob", "purge"]

log = logging.getLogger("flintproxy.store.retention")

PURGE_CHUNK = 5000
DAY_MS = 86_400_000
SPEND_DAYS_KEPT = 62
SPEND_MONTHS_KEPT = 13


async def purge(db: Database, retention_days: int, now_ms: int) -> int:
    """Delete usage rows of accounts deleted at least ``retention_days`` ago; returns rows.

    Deletes in chunks (separate short transactions) so the writer is never blocked
    for long. ``accounts.charged_nano`` is left as it is; the rows' cost goes to
    ``usage_erased`` so the books still balance (store.entries).
    """
    cutoff = now_ms - retention_days * DAY_MS
    return await erase_usage(
        db, "SELECT u.id FROM accounts a JOIN usage u ON u.account_id = a.id "
        "WHERE a.status = 'deleted' AND a.deleted_at <= ? ORDER BY u.id LIMIT ?",
        cutoff, PURGE_CHUNK)


async def prune_spend(db: Database, now_ms: int) -> int:
    """Delete ``key_spend`` rows of periods long over (see the module docstring)."""
    oldest_day = periods(now_ms - SPEND_DAYS_KEPT * DAY_MS)[0]
    t = periods(now_ms)[1]
    year, month = int(t[1:5]), int(t[6:8]) - SPEND_MONTHS_KEPT
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    oldest_month = f"m{year:04d}-{month:02d}"
    return await db.execute(
        "DELETE FROM key_spend WHERE leased_nano = 0 AND ((period LIKE 'd%' AND "
        "period < ?) OR (period LIKE 'm%' AND period < ?)) AND NOT EXISTS (SELECT 1 FROM "
        "cap_leases c WHERE c.key_id = key_spend.key_id AND c.period = key_spend.period)",
        oldest_day, oldest_month)


INTERVAL_S = 3600.0  # how often the composition root runs it


class RetentionJob:
    """``purge`` with the configured retention; the clock is injectable (tests)."""

    def __init__(self, db: Database, retention_days: int, *,
                 clock: Callable[[], int] = sqlite.now_ms) -> None:
        self.db = db
        self.retention_days = retention_days
        self.clock = clock
        self.purged = 0

    async def run_once(self) -> int:
        now = self.clock()
        n = await purge(self.db, self.retention_days, now)
        await prune_spend(self.db, now)
        self.purged += n
        if n:
            log.info("retention: purged %d usage rows of accounts deleted more than %d days ago",
                     n, self.retention_days)
        return n

