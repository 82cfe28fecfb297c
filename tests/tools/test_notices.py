"""The policy-change notice: every active account once, resumable, through the outbox
and a real SMTP server (aiosmtpd), 1,000 accounts."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flintproxy.app.runner import Server as GatewayServer
from flintproxy.config import load_config
from flintproxy.errors import BadRequest
from flintproxy.store.db import Database
from flintproxy.store.notices import notify_all
from flintproxy.tools.mock_smtp import MockSmtp
from tests.conftest import MockServer, raw_config
from tests.support import to_toml

ACCOUNTS = 1000


async def add_accounts(db: Database, n: int) -> set[str]:
    """``n`` accounts, every tenth disabled and every 25th deleted; the active emails."""
    rows = []
    for i in range(n):
        status = "deleted" if i % 25 == 0 else "disabled" if i % 10 == 0 else "active"
        email = None if status == "deleted" else f"user{i}@example.com"
        rows.append((email, status, 0))
    await db.executemany("INSERT INTO accounts (email, status, created_at) VALUES (?, ?, ?)",
                         rows)
    return {str(e) for e, s, _ in rows if s == "active"}


async def test_an_interrupted_notice_resumes_and_queues_every_active_account_exactly_once(
        store_db: Database) -> None:
    active = await add_accounts(store_db, ACCOUNTS)
    first = await notify_all(store_db, "Policy", "We changed it.", batch=300, max_batches=1)
    assert (first.queued_now, first.done, first.resumed) == (300, False, False)
    rest = await notify_all(store_db, "Policy", "We changed it.", batch=300)
    assert rest.resumed and rest.done and rest.queued_total == len(active)
    again = await notify_all(store_db, "Policy", "We changed it.", batch=300)
    assert again.queued_now == 0
    rows = await store_db.fetch("SELECT recipient FROM email_outbox")
    assert sorted(r[0] for r in rows) == sorted(active)
    # Another notice is another run.
    other = await notify_all(store_db, "Policy", "We changed it again.")
    assert other.queued_now == len(active) and not other.resumed


@pytest.mark.parametrize(("subject", "body"), [("", "b"), ("a\r\nBcc: x@y.z", "b"),
                                               ("s" * 201, "b"), ("s", ""), ("s", " \n")])
async def test_a_malformed_notice_is_refused(store_db: Database, subject: str,
                                             body: str) -> None:
    with pytest.raises(BadRequest):
        await notify_all(store_db, subject, body)


@pytest.fixture
async def smtp() -> AsyncIterator[MockSmtp]:
    sink = MockSmtp()
    await sink.start()
    yield sink
    await sink.close()


@pytest.mark.timeout(180)
async def test_the_notice_reaches_1000_accounts_by_smtp_from_the_running_server(
        tmp_path: Path, mock_upstream: MockServer, smtp: MockSmtp) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["email"] = {"host": "127.0.0.1", "port": smtp.port, "starttls": False,
                    "from": "policy@flint.test", "max_per_second": 400}
    path = tmp_path / "flintproxy.toml"
    path.write_text(to_toml(raw))
    server = GatewayServer(load_config(path, {}))
    await server.startup("127.0.0.1", 0, console_port=0)
    try:
        active = await add_accounts(server.components.accounts.db, ACCOUNTS)
        body_file = tmp_path / "notice.txt"
        body_file.write_text("Our privacy policy changes on 1 January.\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flintproxy", "admin", "--config", str(path),
            "notify-policy-change", "--subject", "Privacy policy update",
            "--body-file", str(body_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert f"{len(active)} in all" in err.decode()
        got = await smtp.wait_for(len(active), timeout_s=150)
        assert sorted(m.recipients[0] for m in got) == sorted(active)
        assert {m.subject for m in got} == {"Privacy policy update"}
        # The last row goes once the server's answer to the last message is read.
        db = server.components.accounts.db
        left = -1
        for _ in range(200):
            left = await db.fetchval("SELECT COUNT(*) FROM email_outbox")
            if not left:
                break
            await asyncio.sleep(0.05)
        assert left == 0
    finally:
        await server.shutdown()
