"""Password reset end to end: the real gateway, its outbox sender, a real SMTP server
(aiosmtpd, the mock-smtp sink) receiving the link."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from flintproxy.tools.mock_smtp import MockSmtp
from tests.conftest import Gateway, MockServer, raw_config
from tests.web.test_api import PASSWORD, Browser

NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture
async def smtp() -> AsyncIterator[MockSmtp]:
    sink = MockSmtp()
    await sink.start()
    yield sink
    await sink.close()


@pytest.fixture
async def gw(tmp_path: Path, mock_upstream: MockServer, smtp: MockSmtp,
             gateway_factory: Callable[..., Any]) -> Gateway:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["email"] = {"host": "127.0.0.1", "port": smtp.port, "starttls": False,
                    "from": "noreply@flint.test", "public_url": "https://console.flint.test",
                    "max_per_second": 50}
    gw: Gateway = await gateway_factory(raw)
    return gw


@pytest.fixture
async def browsers(gw: Gateway) -> AsyncIterator[list[Browser]]:
    made = [Browser(gw) for _ in range(3)]
    yield made
    for b in made:
        await b.http.close()


def token_of(text: str) -> str:
    m = re.search(r"https://console\.flint\.test/#reset=([A-Za-z0-9_-]+)", text)
    assert m, "no reset link in the message"
    return m[1]


async def test_a_reset_link_arrives_by_smtp_works_once_and_ends_every_session(
        gw: Gateway, smtp: MockSmtp, browsers: list[Browser]) -> None:
    a, b, anon = browsers
    await a.signup("reset@example.com")
    assert await b.login("reset@example.com") == 200
    answers = [await anon.call("POST", "/api/password-reset", {"email": e})
               for e in ("reset@example.com", "nobody@example.com")]
    assert [r[0] for r in answers] == [202, 202] and answers[0][1] == answers[1][1]
    (mail,) = await smtp.wait_for(1)
    assert mail.recipients == ("reset@example.com",) and "Reset" in mail.subject
    token = token_of(mail.text)
    db = gw.components.accounts.db
    stored = await db.fetch("SELECT token_hash FROM password_resets")
    assert len(stored) == 1 and token.encode() not in bytes(stored[0][0])
    status, _, _ = await anon.call("POST", "/api/password-reset/confirm",
                                   {"token": token, "password": NEW_PASSWORD})
    assert status == 204
    for old in (a, b):
        assert (await old.call("GET", "/api/account"))[0] == 401
    assert await anon.login("reset@example.com") == 401
    assert await anon.login("reset@example.com", NEW_PASSWORD) == 200
    status, body, _ = await anon.call("POST", "/api/password-reset/confirm",
                                      {"token": token, "password": PASSWORD})
    assert status == 400 and body["error"]["code"] == "invalid_token"
    assert await db.fetchval("SELECT COUNT(*) FROM email_outbox") == 0
    assert len(smtp.messages) == 1  # nothing was queued for the unknown address


async def test_an_expired_token_is_refused(gw: Gateway, smtp: MockSmtp,
                                           browsers: list[Browser]) -> None:
    a, _, anon = browsers
    await a.signup("late@example.com")
    await anon.call("POST", "/api/password-reset", {"email": "late@example.com"})
    (mail,) = await smtp.wait_for(1)
    await gw.components.accounts.db.execute("UPDATE password_resets SET expires_at = 1")
    status, body, _ = await anon.call("POST", "/api/password-reset/confirm",
                                      {"token": token_of(mail.text), "password": NEW_PASSWORD})
    assert status == 400 and body["error"]["code"] == "invalid_token"
    assert await anon.login("late@example.com") == 200


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/api/password-reset", {"email": "not-an-email"}, 400),
    ("/api/password-reset", {"email": None}, 400),
    ("/api/password-reset", {"email": "a@b.co", "admin": True}, 400),
    ("/api/password-reset", {"email": "a" * 20_000 + "@b.co"}, 413),
    ("/api/password-reset/confirm", {"token": "x", "password": NEW_PASSWORD}, 400),
    ("/api/password-reset/confirm", {"token": "x" * 5000, "password": NEW_PASSWORD}, 400),
    ("/api/password-reset/confirm", {"token": ["x"], "password": NEW_PASSWORD}, 400),
    ("/api/password-reset/confirm", {"token": "x", "password": "short"}, 400),
    ("/api/password-reset/confirm", {"token": "x"}, 400),
])
async def test_hostile_reset_requests_get_clear_errors(
        gw: Gateway, browsers: list[Browser], path: str, body: object, status: int) -> None:
    got, payload, _ = await browsers[2].call("POST", path, body)
    assert got == status and "error" in payload


async def test_asking_again_and_again_for_one_address_is_throttled(
        gw: Gateway, smtp: MockSmtp, browsers: list[Browser]) -> None:
    a, _, anon = browsers
    await a.signup("flood@example.com")
    statuses = [(await anon.call("POST", "/api/password-reset",
                                 {"email": "flood@example.com"}))[0] for _ in range(8)]
    assert statuses[:5] == [202] * 5 and statuses[-1] == 429
    # One live token at a time: each ask replaced the previous one.
    assert await gw.components.accounts.db.fetchval(
        "SELECT COUNT(*) FROM password_resets") == 1


async def test_without_email_configured_reset_is_a_clear_404(gateway: Gateway) -> None:
    b = Browser(gateway)
    try:
        status, body, _ = await b.call("POST", "/api/password-reset", {"email": "x@y.co"})
    finally:
        await b.http.close()
    assert status == 404 and body["error"]["code"] == "email_disabled"


async def test_concurrent_uses_of_one_reset_token_set_one_password(
        gw: Gateway, smtp: MockSmtp, browsers: list[Browser]) -> None:
    a, _, anon = browsers
    await a.signup("race@example.com")
    await anon.call("POST", "/api/password-reset", {"email": "race@example.com"})
    (mail,) = await smtp.wait_for(1)
    token = token_of(mail.text)
    passwords = [f"new passphrase number {i}" for i in range(6)]
    results = await asyncio.gather(*(anon.call("POST", "/api/password-reset/confirm",
                                               {"token": token, "password": p})
                                     for p in passwords))
    statuses = [r[0] for r in results]
    assert statuses.count(204) == 1 and set(statuses) <= {204, 400, 429}
    winner = passwords[statuses.index(204)]
    # (the losers' refusals made this address wait: check the password in the store)
    repo = gw.components.accounts
    account_id = (await repo.by_email("race@example.com")).id
    assert await repo.verify_login("race@example.com", winner.encode()) == account_id
