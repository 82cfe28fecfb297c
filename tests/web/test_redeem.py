"""POST /api/redeem on the real control plane: credit once, hostile input, throttling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from flintproxy.store.codes import Codes
from flintproxy.web.export import LEDGER_PAGE
from tests.conftest import Gateway
from tests.web.test_api import Browser

USD = 1_000_000_000


@pytest.fixture
async def browser(gateway: Gateway) -> AsyncIterator[Browser]:
    b = Browser(gateway)
    status, _, _ = await b.call("POST", "/api/signup", {"email": "holder@example.com",
                                                        "password": "correct horse battery"})
    assert status == 201
    yield b
    await b.http.close()


async def codes(gw: Gateway, n: int = 1, usd: int = 5) -> list[str]:
    return await Codes(gw.components.accounts).create(n, usd * USD)


async def test_a_code_credits_the_balance_once_and_the_second_try_is_refused(
        gateway: Gateway, browser: Browser) -> None:
    (code,) = await codes(gateway)
    status, body, _ = await browser.call("POST", "/api/redeem", {"code": code})
    assert (status, body) == (200, {"amount_usd": "5.00", "balance_usd": "5.00"})
    status, body, _ = await browser.call("POST", "/api/redeem", {"code": code})
    assert status == 404 and body["error"]["code"] == "invalid_code"
    _, account, _ = await browser.call("GET", "/api/account")
    assert account["balance_usd"] == "5.00"


async def test_concurrent_redemptions_of_one_code_over_http_credit_once(
        gateway: Gateway, browser: Browser) -> None:
    (code,) = await codes(gateway)
    results = await asyncio.gather(*(browser.call("POST", "/api/redeem", {"code": code})
                                     for _ in range(8)))
    assert sorted(r[0] for r in results) == [200] + [404] * 7
    _, account, _ = await browser.call("GET", "/api/account")
    assert account["balance_usd"] == "5.00"


async def test_redeem_needs_a_session_and_the_csrf_token(gateway: Gateway,
                                                         browser: Browser) -> None:
    (code,) = await codes(gateway)
    status, body, _ = await browser.call("POST", "/api/redeem", {"code": code}, csrf=False)
    assert status == 403 and body["error"]["code"] == "csrf_failed"
    status, body, _ = await browser.call("POST", "/api/redeem", {"code": code},
                                         headers={"Origin": "https://evil.example"})
    assert status == 403
    anonymous = Browser(gateway)
    try:
        status, body, _ = await anonymous.call("POST", "/api/redeem", {"code": code})
        assert status == 401
    finally:
        await anonymous.http.close()
    _, account, _ = await browser.call("GET", "/api/account")
    assert account["balance_usd"] == "0.00"


@pytest.mark.parametrize(("body", "status"), [
    ({"code": None}, 400), ({"code": 12}, 400), ({"code": "x" * 10_000}, 400),
    ({"code": "FLINT-0000-0000-0000-0000", "amount": 9}, 400), ([], 400),
    ({"code": {"$ne": ""}}, 400),
])
async def test_malformed_redemptions_are_clear_errors(browser: Browser, body: object,
                                                      status: int) -> None:
    got, payload, _ = await browser.call("POST", "/api/redeem", body)
    assert got == status and payload["error"]["type"] == "invalid_request_error"


async def test_an_oversized_or_non_json_body_is_refused(gateway: Gateway,
                                                        browser: Browser) -> None:
    status, _, _ = await browser.call("POST", "/api/redeem", {"code": "F" * 100_000})
    assert status == 413
    status, _, _ = await browser.call("POST", "/api/redeem", None,
                                      headers={"Content-Type": "text/plain"})
    assert status == 415


async def test_guessing_codes_is_throttled_and_a_real_code_then_waits_too(
        gateway: Gateway, browser: Browser) -> None:
    (code,) = await codes(gateway)
    statuses = []
    for i in range(12):
        status, body, resp = await browser.call(
            "POST", "/api/redeem", {"code": f"FLINT-0000-0000-0000-{i:04d}"})
        statuses.append(status)
    assert statuses[0] == 404 and statuses[-1] == 429
    status, body, resp = await browser.call("POST", "/api/redeem", {"code": code})
    assert status == 429 and body["error"]["code"] == "too_many_redeem_attempts"
    assert int(resp.headers["Retry-After"]) >= 1
    _, account, _ = await browser.call("GET", "/api/account")
    assert account["balance_usd"] == "0.00"
    assert gateway.components.guard.tracked() <= gateway.config.limits.max_tracked


async def test_the_ledger_route_lists_the_newest_entries_first_and_only_the_holders_own(
        gateway: Gateway, browser: Browser) -> None:
    made = await codes(gateway, n=25, usd=1)
    for code in made[:22]:
        assert (await browser.call("POST", "/api/redeem", {"code": code}))[0] == 200
    status, body, _ = await browser.call("GET", "/api/account/ledger")
    assert status == 200 and len(body["data"]) == LEDGER_PAGE == 20
    ids = [e["id"] for e in body["data"]]
    assert ids == sorted(ids, reverse=True)
    assert {(e["amount_usd"], e["amount_nano"], e["reason"]) for e in body["data"]} == {
        ("1.00", USD, "redemption")}
    # Another holder sees none of them; no session, no ledger.
    other = Browser(gateway)
    try:
        assert (await other.call("GET", "/api/account/ledger"))[0] == 401
        await other.call("POST", "/api/signup", {"email": "other@example.com",
                                                 "password": "correct horse battery"})
        assert (await other.call("GET", "/api/account/ledger"))[1] == {"data": []}
        # A query string changes nothing: the page size is the server's.
        status, body, _ = await other.call("GET", "/api/account/ledger?limit=100000")
        assert (status, body) == (200, {"data": []})
    finally:
        await other.http.close()


async def test_the_account_says_top_ups_are_off_without_a_payment_processor(
        browser: Browser) -> None:
    _, account, _ = await browser.call("GET", "/api/account")
    assert account["topups"] is None and account["low_balance_usd"] is None
    await browser.call("POST", "/api/account/low-balance", {"threshold_usd": "3"})
    assert (await browser.call("GET", "/api/account"))[1]["low_balance_usd"] == "3.00"
