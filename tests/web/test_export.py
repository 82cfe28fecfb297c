"""GET /api/account/export: everything held about the account, as one JSON document."""

from __future__ import annotations

import orjson

from flintproxy.store.codes import Codes
from tests.conftest import Gateway
from tests.web.test_api import Browser, chat


async def test_the_export_holds_profile_keys_ledger_and_usage_and_no_secret(
        gateway: Gateway) -> None:
    b = Browser(gateway)
    try:
        signed = await b.signup("export@example.com")  # + an operator credit of 1 USD
        (code,) = await Codes(gateway.components.accounts).create(1, 2 * 10**9)
        assert (await b.call("POST", "/api/redeem", {"code": code}))[0] == 200
        key_id, key = await b.new_key(name="laptop")
        for _ in range(3):
            await chat(gateway, key)
        async with b.http.get(gateway.console_url + "/api/account/export") as resp:
            assert resp.status == 200
            assert "attachment" in resp.headers["Content-Disposition"]
            raw = await resp.read()
        doc = orjson.loads(raw)
        assert doc["account"]["email"] == "export@example.com"
        assert doc["account"]["id"] == signed["account"]["id"]
        assert [k["id"] for k in doc["keys"]] == [key_id] and doc["keys"][0]["name"] == "laptop"
        assert [(e["reason"], e["amount_usd"]) for e in doc["ledger"]] == [
            ("credit", "1.00"), ("redemption", "2.00")]
        assert doc["redeemed_codes"][0]["amount_usd"] == "2.00"
        assert len(doc["usage"]) == 3 and {u["model"] for u in doc["usage"]} == {"gpt-4o-mini"}
        assert key.encode() not in raw and code.encode() not in raw
        assert b"password" not in raw.lower()
        # Disabled: still its data to read.
        await gateway.components.accounts.set_status(signed["account"]["id"], "disabled")
        async with b.http.get(gateway.console_url + "/api/account/export") as resp:
            assert resp.status == 200
    finally:
        await b.http.close()


async def test_the_export_needs_a_session(gateway: Gateway) -> None:
    b = Browser(gateway)
    try:
        status, body, _ = await b.call("GET", "/api/account/export")
        assert status == 401 and body["error"]["code"] == "not_logged_in"
    finally:
        await b.http.close()
