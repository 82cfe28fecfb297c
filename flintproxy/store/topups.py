"""Top-ups through a payment processor (Stripe Checkout): the SQL of their life.

A top-up is recorded when its checkout session is created (``topups``: the session,
the account, the amount WE asked for). The processor's webhook completes it: in ONE
transaction the event id goes into ``payment_events`` (``ON CONFLICT DO NOTHING``: a
replayed or concurrently redelivered event changes nothing), the top-up is marked
complete only if it was not already (a second event about the same session, e.g.
``async_payment_succeeded`` after ``completed``, credits nothing), and the balance
and its ledger entry change (store.entries, reason ``topup``, actor ``stripe:<event>``).
The amount credited is the one recorded at creation, checked against the event's.
"""

from __future__ import annotations

import enum

from flintproxy.store.accounts import Accounts
from flintproxy.store.entries import Reason

__all__ = ["Completion", "Topups"]


class Completion(enum.StrEnum):
    CREDITED = "credited"
    DUPLICATE_EVENT = "duplicate_event"      # this event id was processed before
    ALREADY_COMPLETE = "already_complete"    # another event completed the session
    UNKNOWN_SESSION = "unknown_session"      # not a session this server created
    AMOUNT_MISMATCH = "amount_mismatch"      # the event's amount is not what we asked


class Topups:
    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    async def created(self, session_id: str, account_id: int, amount_nano: int) -> None:
        await self.accounts.db.execute(
            "INSERT INTO topups (session_id, account_id, amount_nano, created_at) "
            "VALUES (?, ?, ?, ?)", session_id, account_id, amount_nano, self.accounts.clock())

    async def seen(self, event_id: str, kind: str) -> bool:
        """Record an event that needs no action; False when it was seen before."""
        return bool(await self.accounts.db.execute(
            "INSERT INTO payment_events (event_id, kind, received_at) VALUES (?, ?, ?) "
            "ON CONFLICT (event_id) DO NOTHING", event_id, kind, self.accounts.clock()))

    async def complete(self, event_id: str, kind: str, session_id: str,
                       paid_nano: int) -> Completion:
        """Credit the session's top-up once (see the module's docstring)."""
        now = self.accounts.clock()
        ev = None
        async with self.accounts.transaction() as q:
            if not await q.execute(
                    "INSERT INTO payment_events (event_id, kind, received_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (event_id) DO NOTHING", event_id, kind, now):
                return Completion.DUPLICATE_EVENT
            row = await q.fetchrow("SELECT account_id, amount_nano, completed_at FROM topups "
                                   "WHERE session_id = ?", session_id)
            if row is None:
                return Completion.UNKNOWN_SESSION
            if row[2] is not None:
                return Completion.ALREADY_COMPLETE
            if int(row[1]) != paid_nano:
                return Completion.AMOUNT_MISMATCH
            if not await q.execute("UPDATE topups SET completed_at = ?, event_id = ? "
                                   "WHERE session_id = ? AND completed_at IS NULL",
                                   now, event_id, session_id):
                return Completion.ALREADY_COMPLETE
            _, ev = await self.accounts.credit_in(q, int(row[0]), int(row[1]), Reason.TOPUP,
                                                  f"stripe:{event_id}")
        self.accounts.publish(ev)
        return Completion.CREDITED
