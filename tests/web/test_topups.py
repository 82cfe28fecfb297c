"""Stripe top-ups end to end: the gateway, the official stripe package, and the local
fake of Stripe as a real HTTP server delivering webhooks signed as Stripe signs them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from flintproxy.store.entries import reconcile
from flintproxy.tools.fake_stripe import FakeStripe, sign, signature_header
from tests.conftest import Gateway, MockServer, raw_config
from tests.web.test_api import Browser

SK, WH = "sk_test_flint", "whsec_flint"


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    server = FakeStripe(secret_key=SK, webhook_secret=WH)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def gw(tmp_path: Path, mock_upstream: MockServer, fake: FakeStripe,
             gateway_factory: Callable[..., Any]) -> Gateway:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["payments"] = {"stripe_secret_key_env": "SK", "stripe_webhook_secret_env": "WH",
                       "api_base": fake.url, "return_url": "https://console.flint.test"}
    gw: Gateway = await gateway_factory(raw, {"SK": SK, "WH": WH})
    fake.webhook_url = gw.console_url + "/api/stripe/webhook"
    return gw


@pytest.fixture
async def holder(gw: Gateway) -> AsyncIterator[Browser]:
    b = Browser(gw)
    status, _, _ = await b.call("POST", "/api/signup", {"email": "payer@example.com",
                                                        "password": "correct horse battery"})
    assert status == 201
    yield b
    await b.http.close()


async def balance(b: Browser) -> str:
    _, account, _ = await b.call("GET", "/api/account")
    return str(account["balance_usd"])


async def pay(fake: FakeStripe, url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(url) as resp:
        assert resp.status == 200
        result: dict[str, Any] = await resp.json()
        return result


async def post_webhook(gw: Gateway, payload: bytes, signature: str | None
                       ) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    async with aiohttp.ClientSession() as http, http.post(
            gw.console_url + "/api/stripe/webhook", data=payload, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


async def test_a_checkout_paid_at_stripe_credits_the_balance_once_with_a_ledger_entry(
        gw: Gateway, fake: FakeStripe, holder: Browser) -> None:
    status, body, _ = await holder.call("POST", "/api/topups", {"amount_usd": "10.00"})
    assert status == 201 and body["url"].startswith(fake.url + "/pay/cs_test_")
    session = fake.sessions[body["id"]]
    assert session["amount_total"] == 1000 and session["success_url"].startswith(
        "https://console.flint.test/")
    assert await balance(holder) == "0.00"  # nothing until Stripe says it was paid
    paid = await pay(fake, body["url"])
    assert paid["delivered_status"] == 200
    assert await balance(holder) == "10.00"
    rows = await gw.components.accounts.db.fetch("SELECT amount_nano, reason, actor FROM credits "
                                                 "WHERE reason = 'topup'")
    assert [tuple(r) for r in rows] == [(10 * 10**9, "topup", f"stripe:{paid['event']['id']}")]
    assert (await reconcile(gw.components.accounts.db)).ok


async def test_replayed_and_concurrently_redelivered_events_credit_once(
        gw: Gateway, fake: FakeStripe, holder: Browser) -> None:
    _, body, _ = await holder.call("POST", "/api/topups", {"amount_usd": "7"})
    event = (await pay(fake, body["url"]))["event"]
    statuses = await asyncio.gather(*(fake.deliver(event) for _ in range(10)))
    assert statuses == [200] * 10
    assert await balance(holder) == "7.00"


async def test_out_of_order_events_about_one_session_credit_it_once(
        gw: Gateway, fake: FakeStripe, holder: Browser) -> None:
    _, body, _ = await holder.call("POST", "/api/topups", {"amount_usd": "5.00"})
    session = fake.sessions[body["id"]]
    unpaid = fake.event("checkout.session.completed", session)  # async payment pending
    session.update(status="complete", payment_status="paid")
    succeeded = fake.event("checkout.session.async_payment_succeeded", session)
    completed = fake.event("checkout.session.completed", session)
    expired = fake.event("checkout.session.expired", {**session, "status": "expired"})
    for ev in (succeeded, expired, unpaid, completed):
        assert await fake.deliver(ev) == 200
    assert await balance(holder) == "5.00"
    assert (await reconcile(gw.components.accounts.db)).ok


async def test_events_about_other_sessions_or_other_amounts_credit_nothing(
        gw: Gateway, fake: FakeStripe, holder: Browser) -> None:
    _, body, _ = await holder.call("POST", "/api/topups", {"amount_usd": "5.00"})
    session = {**fake.sessions[body["id"]], "payment_status": "paid"}
    for obj in ({**session, "id": "cs_test_someone_else"}, {**session, "amount_total": 999_999}):
        status, result = await post_webhook(
            gw, payload := orjson.dumps(fake.event("checkout.session.completed", obj)),
            signature_header(WH, payload))
        assert status == 200 and result["result"] in ("unknown_session", "amount_mismatch")
    assert await balance(holder) == "0.00"


async def test_webhooks_with_bad_signatures_are_refused_and_credit_nothing(
        gw: Gateway, fake: FakeStripe, holder: Browser) -> None:
    _, body, _ = await holder.call("POST", "/api/topups", {"amount_usd": "5.00"})
    session = {**fake.sessions[body["id"]], "payment_status": "paid"}
    payload = orjson.dumps(fake.event("checkout.session.completed", session))
    now = int(time.time())
    bad = [
        None, "", "garbage", "t=abc,v1=zz", f"t={now}",
        signature_header("whsec_wrong", payload),
        f"t={now},v1={sign(WH, now, payload + b' ')}",
        f"t={now - 3600},v1={sign(WH, now - 3600, payload)}",  # replayed an hour later
        f"t={now},v0={sign(WH, now, payload)}",
    ]
    tampered = payload.replace(b'"amount_total":500', b'"amount_total":50000')
    codes = []
    for body_sent, sig in [*((payload, s) for s in bad),
                           (tampered, signature_header(WH, payload))]:
        status, result = await post_webhook(gw, body_sent, sig)
        codes.append((status, result["error"]["code"]))
    # The first few are told why; then the sender's address waits (the IP guard's
    # backoff for failed authentication), whatever it sends.
    assert codes[:3] == [(400, "invalid_signature")] * 3
    assert set(codes) <= {(400, "invalid_signature"), (429, "too_many_failed_attempts")}
    assert codes[-1][0] == 429
    assert await balance(holder) == "0.00"


async def test_hostile_webhook_bodies_get_clear_errors(gw: Gateway) -> None:
    huge = b'{"id": "evt_1", "type": "x", "pad": "' + b"a" * 100_000 + b'"}'
    assert (await post_webhook(gw, huge, signature_header(WH, huge)))[0] == 413
    for payload in (b"not json", b"[]", b'{"id": 5, "type": "x"}', b'{"type": "x"}',
                    b"\xff\xfe", b'{"id": "' + b"e" * 300 + b'", "type": "x"}'):
        status, result = await post_webhook(gw, payload, signature_header(WH, payload))
        assert status == 400 and "error" in result, payload
    ok = b'{"id": "evt_other", "type": "customer.created", "data": {"object": {}}}'
    assert (await post_webhook(gw, ok, signature_header(WH, ok)))[1]["result"] == "ignored"
    assert (await post_webhook(gw, ok, signature_header(WH, ok)))[1]["result"] == \
        "duplicate_event"


@pytest.mark.parametrize("amount", ["0", "-5", "5.001", "4.99", "1000.01", "1e9", 10.5, True,
                                    None, "abc", "9" * 40, ["10"], "NaN", "Infinity"])
async def test_top_up_amounts_out_of_range_or_not_in_cents_are_refused(
        gw: Gateway, fake: FakeStripe, holder: Browser, amount: object) -> None:
    status, body, _ = await holder.call("POST", "/api/topups", {"amount_usd": amount})
    assert status == 400 and body["error"]["param"] == "amount_usd"
    assert fake.sessions == {}


async def test_a_top_up_needs_a_session_and_csrf(gw: Gateway, fake: FakeStripe,
                                                 holder: Browser) -> None:
    assert (await holder.call("POST", "/api/topups", {"amount_usd": "5"}, csrf=False))[0] == 403
    anon = Browser(gw)
    try:
        assert (await anon.call("POST", "/api/topups", {"amount_usd": "5"}))[0] == 401
    finally:
        await anon.http.close()
    assert fake.sessions == {}


async def test_stripe_unreachable_is_a_502_and_no_top_up_is_recorded(
        gw: Gateway, fake: FakeStripe, holder: Browser) -> None:
    await fake.close()
    status, body, _ = await holder.call("POST", "/api/topups", {"amount_usd": "5.00"})
    assert status == 502 and body["error"]["code"] == "payment_processor_error"
    assert await gw.components.accounts.db.fetchval("SELECT COUNT(*) FROM topups") == 0


async def test_without_payments_configured_top_ups_are_a_clear_404(gateway: Gateway) -> None:
    b = Browser(gateway)
    try:
        await b.call("POST", "/api/signup", {"email": "x@example.com",
                                             "password": "correct horse battery"})
        status, body, _ = await b.call("POST", "/api/topups", {"amount_usd": "5"})
        assert status == 404 and body["error"]["code"] == "payments_disabled"
        payload = b"{}"
        status, _ = await post_webhook(gateway, payload, signature_header(WH, payload))
        assert status == 404
    finally:
        await b.http.close()


async def test_the_account_offers_top_ups_between_the_configured_amounts(
        holder: Browser) -> None:
    _, account, _ = await holder.call("GET", "/api/account")
    assert account["topups"] == {"min_usd": "5.00", "max_usd": "1000.00"}


async def test_the_fake_checkout_page_pays_and_returns_the_browser_to_the_success_url(
        gw: Gateway, fake: FakeStripe, holder: Browser) -> None:
    _, body, _ = await holder.call("POST", "/api/topups", {"amount_usd": "6.00"})
    async with aiohttp.ClientSession() as http:
        async with http.get(body["url"]) as page:
            assert page.status == 200 and "Pay 6.00 USD" in await page.text()
        async with http.post(body["url"], data={"pay": "1"}, allow_redirects=False) as paid:
            assert paid.status == 303
            assert paid.headers["Location"] == "https://console.flint.test/#topup=done"
        async with http.get(body["url"]) as again:
            assert again.status == 404  # no longer open
    assert await balance(holder) == "6.00"
