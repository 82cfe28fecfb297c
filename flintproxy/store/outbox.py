"""The email outbox: messages written in the transaction of what caused them, sent
later by the composition root's background sender (ops.mailer.OutboxSender).

Why a table and not a send on the request: an endpoint never waits for a mail server,
a message is never lost to a crash or an SMTP outage (it waits, retried with
backoff), and a message is never sent for a change that rolled back. A row is deleted
once the mail server accepted it.

Several processes or nodes may run senders on one database: a sender *claims* a due
row (a conditional UPDATE moving its ``next_attempt_at`` a lease ahead), so one
message goes out once; a sender that dies mid-send leaves it to be retried when the
lease ends. The body (a reset link, a notice) lives here only until sent, and with a
data key the recipient and body are sealed (store.pii) even then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flintproxy.store.db import Database, Queries
from flintproxy.store.pii import PiiCodec
from flintproxy.store.sqlite import now_ms

__all__ = ["Mail", "Outbox", "enqueue"]


@dataclass(frozen=True, slots=True)
class Mail:
    id: int
    recipient: str
    subject: str
    body: str
    attempts: int


async def enqueue(q: Queries, recipient: str, subject: str, body: str, now: int,
                  pii: PiiCodec | None = None) -> None:
    """Queue one message inside the caller's transaction (sealed when ``pii`` has a key)."""
    if pii is not None:
        recipient = pii.seal_text(recipient, "email_outbox.recipient")
        body = pii.seal_text(body, "email_outbox.body")
    await q.execute("INSERT INTO email_outbox (recipient, subject, body, next_attempt_at, "
                    "created_at) VALUES (?, ?, ?, ?, ?)", recipient, subject, body, now, now)


class Outbox:
    """The outbox's SQL for the sender."""

    def __init__(self, db: Database, clock: Callable[[], int] = now_ms,
                 pii: PiiCodec | None = None) -> None:
        self.db = db
        self.clock = clock
        self.pii = pii or PiiCodec()

    async def claim(self, limit: int, lease_ms: int) -> list[Mail]:
        """Up to ``limit`` due messages, each claimed for ``lease_ms``, oldest first."""
        now = self.clock()
        rows = await self.db.fetch(
            "SELECT id, recipient, subject, body, attempts, next_attempt_at FROM email_outbox "
            "WHERE next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?", now, limit)
        claimed = []
        for r in rows:
            if await self.db.execute(
                    "UPDATE email_outbox SET next_attempt_at = ? WHERE id = ? "
                    "AND next_attempt_at = ?", now + lease_ms, r[0], r[5]):
                claimed.append(Mail(int(r[0]),
                                    self.pii.open_text(r[1], "email_outbox.recipient"), r[2],
                                    self.pii.open_text(r[3], "email_outbox.body"), int(r[4])))
        return claimed

    async def sent(self, mail_id: int) -> None:
        await self.db.execute("DELETE FROM email_outbox WHERE id = ?", mail_id)

    async def retry(self, mail_id: int, attempts: int, delay_ms: int) -> None:
        await self.db.execute("UPDATE email_outbox SET attempts = ?, next_attempt_at = ? "
                              "WHERE id = ?", attempts, self.clock() + delay_ms, mail_id)

    async def pending(self) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM email_outbox"))
