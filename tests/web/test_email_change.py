"""An email change waits for the new address's confirmation (with [email] on)."""

from __future__ import annotations

import re

from flintproxy.tools.mock_smtp import MockSmtp
from tests.conftest import Gateway
from tests.web.test_api import PASSWORD, Browser
from tests.web.test_password_reset import browsers, gw, smtp  # noqa: F401 (fixtures)


def link_token(text: str) -> str:
    m = re.search(r"#confirm-email=([A-Za-z0-9_-]+)", text)
    assert m, "no confirmation link"
    return m[1]


async def test_the_email_changes_only_when_the_new_address_confirms(
        gw: Gateway, smtp: MockSmtp, browsers: list[Browser]) -> None:  # noqa: F811
    a, other, anon = browsers
    await a.signup("old@example.com")
    status, body, _ = await a.call("POST", "/api/account/email",
                                   {"new_email": "new@example.com", "password": PASSWORD})
    assert status == 202 and body["pending_email"] == "new@example.com"
    assert (await a.call("GET", "/api/account"))[1]["email"] == "old@example.com"
    (mail,) = await smtp.wait_for(1)
    assert mail.recipients == ("new@example.com",)
    token = link_token(mail.text)
    status, account, _ = await anon.call("POST", "/api/account/email/confirm", {"token": token})
    assert status == 200 and account["email"] == "new@example.com"
    assert await anon.login("new@example.com") == 200
    assert await other.login("old@example.com") == 401
    status, body, _ = await anon.call("POST", "/api/account/email/confirm", {"token": token})
    assert status == 400 and body["error"]["code"] == "invalid_token"


async def test_an_email_change_to_a_taken_address_or_with_a_wrong_password_is_refused(
        gw: Gateway, smtp: MockSmtp, browsers: list[Browser]) -> None:  # noqa: F811
    a, b, _ = browsers
    await a.signup("first@example.com")
    await b.signup("second@example.com")
    status, body, _ = await a.call("POST", "/api/account/email",
                                   {"new_email": "second@example.com", "password": PASSWORD})
    assert status == 409 and body["error"]["code"] == "email_taken"
    status, _, _ = await a.call("POST", "/api/account/email",
                                {"new_email": "third@example.com", "password": "wrong one!!"})
    assert status == 401
    statuses = [(await a.call("POST", "/api/account/email/confirm", bad))[0]
                for bad in ({"token": "x"}, {"token": 5}, {"token": "x" * 500}, {})]
    # Wrong tokens are failed authentications of the address: soon it waits.
    assert statuses[0] == 400 and set(statuses) <= {400, 429}
    assert smtp.messages == []


async def test_the_low_balance_threshold_is_set_and_cleared_through_the_api(
        gw: Gateway, browsers: list[Browser]) -> None:  # noqa: F811
    a, _, anon = browsers
    await a.signup("thr@example.com")
    status, body, _ = await a.call("POST", "/api/account/low-balance", {"threshold_usd": "2.5"})
    assert (status, body) == (200, {"threshold_usd": "2.50"})
    for bad in ({"threshold_usd": 2}, {"threshold_usd": "-1"}, {"threshold_usd": "0"},
                {"threshold_usd": "abc"}, {"threshold_usd": "1" * 40}, {"other": 1}):
        assert (await a.call("POST", "/api/account/low-balance", bad))[0] == 400
    assert (await a.call("POST", "/api/account/low-balance", {"threshold_usd": None}))[1] == {
        "threshold_usd": None}
    assert (await anon.call("POST", "/api/account/low-balance", {"threshold_usd": "1"}))[0] \
        == 401
