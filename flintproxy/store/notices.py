"""Notices to every active account (``flintproxy admin notify-policy-change``):
resumable, and sent at a bounded rate.

The privacy policy promises that material changes are notified by email. A notice
is identified by the SHA-256 of its subject and body; its row remembers the last
account it was queued for. Accounts are taken in id order, a batch at a time, each
batch ONE transaction that queues its messages in the outbox and advances the mark:
a run interrupted anywhere (Ctrl-C, a crash, the database gone) and started again
with the same subject and body queues each remaining account exactly once, never an
account twice. Sending is the outbox's (ops.mailer.OutboxSender): at most
``[email] max_per_second``, retried with backoff, whatever the number of accounts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from flintproxy.errors import BadRequest
from flintproxy.store.db import Database
from flintproxy.store.outbox import enqueue
from flintproxy.store.pii import PiiCodec
from flintproxy.store.sqlite import now_ms

__all__ = ["NoticeRun", "notify_all"]

BATCH = 500
MAX_SUBJECT_CHARS = 200
MAX_BODY_CHARS = 100_000


@dataclass(frozen=True, slots=True)
class NoticeRun:
    queued_now: int
    queued_total: int
    resumed: bool
    done: bool


async def notify_all(db: Database, subject: str, body: str, *, batch: int = BATCH,
                     max_batches: int | None = None, pii: PiiCodec | None = None
                     ) -> NoticeRun:
    """Queue the notice for every active account not yet queued (see the docstring)."""
    if not subject.strip() or len(subject) > MAX_SUBJECT_CHARS or any(
            c in subject for c in "\r\n"):
        raise BadRequest(f"--subject must be one line of at most {MAX_SUBJECT_CHARS} "
                         "characters.")
    if not body.strip() or len(body) > MAX_BODY_CHARS:
        raise BadRequest(f"the body must be non-empty text of at most {MAX_BODY_CHARS} "
                         "characters.")
    pii = pii or PiiCodec()
    digest = hashlib.sha256(subject.encode() + b"\0" + body.encode()).hexdigest()
    await db.execute("INSERT INTO notices (digest, created_at) VALUES (?, ?) "
                     "ON CONFLICT (digest) DO NOTHING", digest, now_ms())
    row = await db.fetchrow("SELECT id, last_account_id, queued, done_at FROM notices "
                            "WHERE digest = ?", digest)
    assert row is not None
    notice_id, resumed = int(row[0]), int(row[1]) > 0
    queued, now = 0, now_ms()
    batches = 0
    while max_batches is None or batches < max_batches:
        async with db.transaction() as q:
            last = int(await q.fetchval("SELECT last_account_id FROM notices WHERE id = ?",
                                        notice_id))
            rows = await q.fetch("SELECT id, email, email_sealed FROM accounts WHERE id > ? "
                                 "AND status = 'active' AND email IS NOT NULL "
                                 "ORDER BY id LIMIT ?", last, batch)
            for _, column, sealed in rows:
                await enqueue(q, str(pii.reveal(column, sealed)), subject, body, now, pii)
            if rows:
                await q.execute("UPDATE notices SET last_account_id = ?, queued = queued + ? "
                                "WHERE id = ?", rows[-1][0], len(rows), notice_id)
            else:
                await q.execute("UPDATE notices SET done_at = COALESCE(done_at, ?) "
                                "WHERE id = ?", now, notice_id)
        queued += len(rows)
        batches += 1
        if not rows:
            break
    total = int(await db.fetchval("SELECT queued FROM notices WHERE id = ?", notice_id))
    done = await db.fetchval("SELECT done_at FROM notices WHERE id = ?", notice_id)
    return NoticeRun(queued, total, resumed, done is not None)
