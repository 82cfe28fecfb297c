"""The SMTP sender, against the mock SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from flintproxy.config import EmailConfig
from flintproxy.ops.mailer import MAX_ATTEMPTS, Mailer, MailError, OutboxSender, compose
from flintproxy.store.db import SqliteDatabase
from flintproxy.store.outbox import Outbox, enqueue
from flintproxy.tools.mock_smtp import MockSmtp


async def test_a_message_reaches_the_smtp_server_with_login_and_nothing_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sink = MockSmtp()
    port = await sink.start()
    try:
        cfg = EmailConfig(host="127.0.0.1", port=port, starttls=False, username="flint",
                          password="pw", sender="noreply@flint.test")
        await Mailer(cfg).send(compose(cfg, "alice@example.com", "Reset", "secret link"))
        (got,) = await sink.wait_for(1)
    finally:
        await sink.close()
    assert got.recipients == ("alice@example.com",) and got.sender == "noreply@flint.test"
    assert got.subject == "Reset" and got.text.strip() == "secret link"
    assert got.login == "flint"
    assert "secret link" not in caplog.text and "alice@example.com" not in caplog.text


async def test_an_absent_server_is_a_transient_failure_that_names_no_recipient() -> None:
    sink = MockSmtp()
    port = await sink.start()
    await sink.close()
    cfg = EmailConfig(host="127.0.0.1", port=port, starttls=False, timeout_s=2.0)
    with pytest.raises(MailError) as caught:
        await Mailer(cfg).send(compose(cfg, "alice@example.com", "s", "b"))
    assert not caught.value.permanent
    assert "alice" not in str(caught.value)


async def test_starttls_required_against_a_server_without_it_fails_rather_than_send_clear(
        ) -> None:
    sink = MockSmtp()
    port = await sink.start()
    try:
        cfg = EmailConfig(host="127.0.0.1", port=port, starttls=True, timeout_s=2.0)
        with pytest.raises(MailError):
            await Mailer(cfg).send(compose(cfg, "alice@example.com", "s", "b"))
        assert sink.messages == []
    finally:
        await sink.close()


async def test_the_outbox_retries_with_backoff_until_the_server_is_back_then_deletes_the_row(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    db = await SqliteDatabase.open(tmp_path / "o.db")
    now = [1_000_000]
    outbox = Outbox(db, clock=lambda: now[0])
    sink = MockSmtp()
    port = await sink.start()
    await sink.close()  # the mail server is down
    try:
        cfg = EmailConfig(host="127.0.0.1", port=port, starttls=False, timeout_s=2.0)
        sender = OutboxSender(outbox, Mailer(cfg))
        async with db.transaction() as q:
            await enqueue(q, "bob@example.com", "Notice", "the body text", now[0])
        assert await sender.run_once() == 0
        row = await db.fetchrow("SELECT attempts, next_attempt_at FROM email_outbox")
        assert row is not None and tuple(row) == (1, now[0] + 1000)
        assert await sender.run_once() == 0 and await outbox.pending() == 1  # not yet due
        now[0] += 1000
        await sender.run_once()
        row = await db.fetchrow("SELECT attempts, next_attempt_at FROM email_outbox")
        assert row is not None and tuple(row) == (2, now[0] + 2000)  # doubled
        await sink.start(port=port)  # back
        now[0] += 2000
        assert await sender.run_once() == 1
        (got,) = await sink.wait_for(1)
        assert got.text.strip() == "the body text" and await outbox.pending() == 0
    finally:
        await sink.close()
        await db.close()
    # Ours (the gateway's log filter, ops.logfilter, scrubs the drivers' own DEBUG lines).
    ours = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("flintproxy"))
    assert "not sent" in ours
    assert "the body text" not in ours and "bob@example.com" not in ours


async def test_a_message_that_keeps_failing_is_dropped_after_the_last_attempt(
        tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "o.db")
    outbox = Outbox(db)
    sink = MockSmtp()
    port = await sink.start()
    await sink.close()
    try:
        sender = OutboxSender(outbox, Mailer(EmailConfig(host="127.0.0.1", port=port,
                                                         starttls=False, timeout_s=2.0)))
        async with db.transaction() as q:
            await enqueue(q, "bob@example.com", "s", "b", outbox.clock())
        await db.execute("UPDATE email_outbox SET attempts = ?", MAX_ATTEMPTS - 1)
        await sender.run_once()
        assert await outbox.pending() == 0 and sender.dropped == 1
    finally:
        await db.close()


async def test_two_senders_on_one_outbox_send_each_message_once(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "o.db")
    sink = MockSmtp()
    port = await sink.start()
    try:
        cfg = EmailConfig(host="127.0.0.1", port=port, starttls=False, max_per_second=100)
        async with db.transaction() as q:
            for i in range(20):
                await enqueue(q, f"u{i}@example.com", "s", "b", 0)
        senders = [OutboxSender(Outbox(db), Mailer(cfg)) for _ in range(2)]
        sent = await asyncio.gather(*(s.run_once() for s in senders))
        assert sum(sent) == 20
        await sink.wait_for(20)
        assert sorted(m.recipients[0] for m in sink.messages) == sorted(
            f"u{i}@example.com" for i in range(20))
    finally:
        await sink.close()
        await db.close()
