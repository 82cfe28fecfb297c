"""The opt-in low-balance notice: one email when the balance falls below the holder's
threshold, re-armed once it is back at or above it.

Not on the request path: a background job of the composition root (``INTERVAL_S``)
finds the accounts below their threshold and not yet told, and for each, in one
transaction, claims it (``low_balance_notified`` 0 -> 1, conditional: several
servers never send two) and queues the email in the outbox. Accounts back above their
threshold are re-armed by the same job.
"""

from __future__ import annotations

from flintproxy.errors import BadRequest, NotFound
from flintproxy.money import format_usd
from flintproxy.store.accounts import Accounts
from flintproxy.store.outbox import enqueue

__all__ = ["INTERVAL_S", "LowBalance"]

INTERVAL_S = 60.0
BATCH = 200
MAX_THRESHOLD_NANO = 10**6 * 10**9  # one million USD


class LowBalance:
    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    async def set_threshold(self, account_id: int, threshold_nano: int | None) -> None:
        """Opt in (a threshold) or out (None); a new threshold re-arms the notice."""
        if threshold_nano is not None and not 0 < threshold_nano <= MAX_THRESHOLD_NANO:
            raise BadRequest("threshold_usd must be more than 0 and at most 1000000.",
                             param="threshold_usd")
        if not await self.accounts.db.execute(
                "UPDATE accounts SET low_balance_nano = ?, low_balance_notified = 0 "
                "WHERE id = ? AND status != 'deleted'", threshold_nano, account_id):
            raise NotFound("No such account.")

    async def threshold(self, account_id: int) -> int | None:
        """The account's threshold in nano-USD, or None when it has not opted in."""
        value = await self.accounts.db.fetchval(
            "SELECT low_balance_nano FROM accounts WHERE id = ?", account_id)
        return None if value is None else int(value)

    async def run_once(self) -> int:
        """Queue the notices due; returns how many were queued."""
        db, pii = self.accounts.db, self.accounts.pii
        await db.execute("UPDATE accounts SET low_balance_notified = 0 "
                         "WHERE low_balance_notified = 1 AND (low_balance_nano IS NULL "
                         "OR balance_nano >= low_balance_nano)")
        rows = await db.fetch(
            "SELECT id, email, email_sealed, balance_nano, low_balance_nano FROM accounts "
            "WHERE low_balance_nano IS NOT NULL AND balance_nano < low_balance_nano "
            "AND low_balance_notified = 0 AND status = 'active' AND email IS NOT NULL "
            "ORDER BY id LIMIT ?", BATCH)
        queued = 0
        for account_id, column, sealed, balance, threshold in rows:
            email = pii.reveal(column, sealed)
            assert email is not None
            async with self.accounts.transaction() as q:
                if not await q.execute("UPDATE accounts SET low_balance_notified = 1 "
                                       "WHERE id = ? AND low_balance_notified = 0",
                                       account_id):
                    continue
                await enqueue(q, email, "Your flintproxy balance is low",
                              f"Your balance is {format_usd(int(balance))} USD, below the "
                              f"{format_usd(int(threshold))} USD you asked to be told "
                              "about.\n\nTop it up in the console to keep your API keys "
                              "working. You can change or turn off this notice there too.\n",
                              self.accounts.clock(), pii)
            queued += 1
        return queued
