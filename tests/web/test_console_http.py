"""The console over plain HTTP: security headers, caching, the operator API's rules.

The browser journeys (test_console_browser.py) show the pages work; these pin what
a browser cannot be trusted to notice: the headers on every response, the hashed
immutable assets, who may call /api/admin/, and hostile input to the new routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from flintproxy.app.runner import Server as GatewayServer
from flintproxy.config import load_config
from flintproxy.tools import admin
from flintproxy.web.console import CSP, STATIC_DIR
from tests.conftest import Gateway, MockServer, raw_config
from tests.support import to_toml
from tests.web.test_api import MESSAGES, Browser, chat, sdk

SECURITY = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
ASSET_RE = re.compile(r'(?:src|href)="(/static/[^"]+)"')
ADMIN_ROUTES = (
    ("GET", "/api/admin/accounts?email=a", None),
    ("GET", "/api/admin/accounts/1", None),
    ("POST", "/api/admin/accounts/1/credit", {"amount_usd": "1.00", "note": "n"}),
    ("POST", "/api/admin/accounts/1/debit", {"amount_usd": "1.00", "note": "n"}),
    ("POST", "/api/admin/accounts/1/disable", {}),
    ("POST", "/api/admin/accounts/1/enable", {}),
    ("POST", "/api/admin/accounts/1/limits", {"rpm": 5}),
    ("POST", "/api/admin/keys/1/revoke", {}),
    ("GET", "/api/admin/audit", None),
)


@pytest.fixture
def config_path(tmp_path: Path, mock_upstream: MockServer) -> Path:
    path = tmp_path / "flintproxy.toml"
    path.write_text(to_toml(raw_config(tmp_path, {"local": mock_upstream.base_url})))
    return path


@pytest.fixture
async def gw(config_path: Path) -> AsyncIterator[Gateway]:
    config = load_config(config_path, {})
    gateway = Gateway(server=GatewayServer(config), config=config, key="")
    await gateway.server.startup("127.0.0.1", 0, console_port=0)
    yield gateway
    await gateway.server.shutdown()


async def cli(config_path: Path, *args: str) -> int:
    """``flintproxy admin`` as cli.py runs it (in a thread: it has its own event loop)."""
    return await asyncio.to_thread(admin.main, ["--config", str(config_path), *args])


async def operator(gw: Gateway, config_path: Path, email: str) -> Browser:
    b = Browser(gw)
    await b.signup(email)
    assert await cli(config_path, "grant-operator", email) == 0
    return b


def audit_rows(gw: Gateway) -> list[tuple[Any, ...]]:
    with sqlite3.connect(gw.config.storage.path) as db:
        return db.execute("SELECT operator_id, action, target_account_id, target_key_id, "
                          "amount_nano, note FROM audit ORDER BY id").fetchall()


# --- headers and caching -------------------------------------------------------------


async def test_every_console_response_carries_the_strict_csp_and_security_headers(
        gw: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.console_url + "/") as resp:
            html = await resp.text()
        paths = ["/", *ASSET_RE.findall(html), "/api/account", "/api/nope", "/openapi.json",
                 "/static/nope.js", "/metrics"]
        for path in paths:
            async with http.get(gw.console_url + path) as resp:
                for name, value in SECURITY.items():
                    assert resp.headers.get(name) == value, (path, name)
    assert "'unsafe-inline'" not in CSP and "frame-ancestors 'none'" in CSP
    # Also on what the server answers itself: a request that is not HTTP.
    port = int(gw.console_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400"
    head = answer.split(b"\r\n\r\n", 1)[0].decode()
    for name, value in SECURITY.items():
        assert f"\r\n{name}: {value}" in head, name


async def test_the_page_has_no_inline_script_or_style_and_no_other_origin() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)
    for f in STATIC_DIR.rglob("*"):
        if f.suffix in (".html", ".js", ".css") and "vendor" not in f.parts:
            text = f.read_text()
            assert not re.search(r"https?://", text), f
            assert "innerHTML" not in text and "eval(" not in text, f


async def test_assets_are_content_hashed_and_immutable_and_the_page_is_revalidated(
        gw: Gateway) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(gw.console_url + "/", headers={"Accept-Encoding": "identity"}
                            ) as resp:
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.content_type == "text/html"
            etag = resp.headers["ETag"]
            html = await resp.text()
        async with http.get(gw.console_url + "/", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
        assets = ASSET_RE.findall(html)
        assert {a.split("/")[-1].split(".")[0] for a in assets} >= {"console", "favicon"}
        for url in assets + [m for m in re.findall(r'data-uplot-(?:js|css)="([^"]+)"', html)]:
            async with http.get(gw.console_url + url,
                                headers={"Accept-Encoding": "identity"}) as resp:
                assert resp.status == 200, url
                assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
                body = await resp.read()
            digest = url.rsplit(".", 2)[-2]
            assert hashlib.sha256(body).hexdigest()[:12] == digest, url
            async with http.get(gw.console_url + url,
                                headers={"Accept-Encoding": "gzip"}) as resp:
                if len(body) > 1000:
                    assert resp.headers["Content-Encoding"] == "gzip"
                    assert len(await resp.read()) < len(body)
        # A stale or made-up name is a 404 in the API's error shape, never a file read.
        for bad in ("/static/console.000000000000.js", "/static/../setup.cfg",
                    "/static/%2e%2e/%2e%2e/setup.cfg", "/static/vendor/uplot/LICENSE",
                    "/static/index.html"):
            async with http.get(gw.console_url + bad) as resp:
                assert resp.status == 404, bad
                assert "error" in await resp.json()


async def test_the_first_page_load_weighs_under_100_kb(gw: Gateway) -> None:
    total = 0
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.console_url + "/") as resp:
            html = await resp.text()
            total += int(resp.headers.get("Content-Length", len(html)))
        for url in ASSET_RE.findall(html):
            async with http.get(gw.console_url + url) as resp:
                total += int(resp.headers["Content-Length"])
    assert 0 < total < 100_000


# --- the operator API: who may call it --------------------------------------------


async def test_the_operator_api_refuses_strangers_401_and_account_holders_403(
        gw: Gateway, config_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path, body in ADMIN_ROUTES:
            async with http.request(method, gw.console_url + path, json=body) as resp:
                assert resp.status == 401, path
    holder = Browser(gw)
    await holder.signup("holder@example.com")
    for method, path, body in ADMIN_ROUTES:
        status, payload, _ = await holder.call(method, path, body)
        assert status == 403 and payload["error"]["code"] == "not_operator", path
    status, account, _ = await holder.call("GET", "/api/account")
    assert account["operator"] is False
    assert audit_rows(gw) == []
    # Granted, then revoked: the role goes as it came, both in the audit log.
    assert await cli(config_path, "grant-operator", "holder@example.com") == 0
    assert (await holder.call("GET", "/api/account"))[1]["operator"] is True
    assert (await holder.call("GET", "/api/admin/audit"))[0] == 200
    assert await cli(config_path, "revoke-operator", "holder@example.com") == 0
    assert (await holder.call("GET", "/api/admin/audit"))[0] == 403
    assert [r[1] for r in audit_rows(gw)] == ["grant_operator", "revoke_operator"]
    assert await cli(config_path, "grant-operator", "nobody@example.com") == 1
    await holder.http.close()


async def test_operator_changes_need_the_csrf_token_and_a_same_origin_request(
        gw: Gateway, config_path: Path) -> None:
    op = await operator(gw, config_path, "op@example.com")
    target = await gw.components.accounts.create_account("t@example.com", None)
    path = f"/api/admin/accounts/{target}/credit"
    body = {"amount_usd": "1.00", "note": "n"}
    status, payload, _ = await op.call("POST", path, body, csrf=False)
    assert status == 403 and payload["error"]["code"] == "csrf_failed"
    status, payload, _ = await op.call("POST", path, body,
                                       headers={"Origin": "https://evil.example"})
    assert status == 403
    assert (await gw.components.accounts.get(target)).balance_nano == 0
    # A disabled operator may read but not act.
    op_id = (await op.call("GET", "/api/account"))[1]["id"]
    await gw.components.accounts.set_status(op_id, "disabled")
    assert (await op.call("GET", "/api/admin/audit"))[0] == 200
    status, payload, _ = await op.call("POST", path, body)
    assert status == 403 and payload["error"]["code"] == "account_disabled"
    await op.http.close()


# --- money: credit and debit -------------------------------------------------------


async def test_credit_and_debit_are_ledger_entries_with_a_note_and_reach_the_gateway(
        gw: Gateway, config_path: Path) -> None:
    op = await operator(gw, config_path, "op@example.com")
    holder = Browser(gw)
    who = (await holder.signup("payer@example.com"))["account"]["id"]  # $1 from signup()
    _, key = await holder.new_key()
    status, after, _ = await op.call("POST", f"/api/admin/accounts/{who}/credit",
                                     {"amount_usd": "2.50", "note": "refund ticket 7"})
    assert status == 200 and after["balance_usd"] == "3.50"
    status, after, _ = await op.call("POST", f"/api/admin/accounts/{who}/debit",
                                     {"amount_usd": "3.50", "note": "chargeback"})
    assert status == 200 and after["balance_nano"] == 0
    # The running gateway re-read the balance: the key is refused for want of funds.
    with pytest.raises(openai.APIStatusError) as refused:
        for _ in range(40):
            await chat(gw, key)
            await asyncio.sleep(0.05)
    assert refused.value.status_code == 402
    with sqlite3.connect(gw.config.storage.path) as db:
        credits = [r[0] for r in db.execute(
            "SELECT amount_nano FROM credits WHERE account_id = ? ORDER BY id", (who,))]
        account = db.execute("SELECT credited_nano, charged_nano, balance_nano FROM accounts "
                             "WHERE id = ?", (who,)).fetchone()
    assert credits == [10**9, 2_500_000_000, -3_500_000_000]
    assert account == (sum(credits), 0, 0)
    op_id = (await op.call("GET", "/api/account"))[1]["id"]
    assert audit_rows(gw)[-2:] == [
        (op_id, "credit", who, None, 2_500_000_000, "refund ticket 7"),
        (op_id, "debit", who, None, -3_500_000_000, "chargeback")]
    await op.http.close()
    await holder.http.close()


@pytest.mark.parametrize("body", [
    {"amount_usd": 5.0, "note": "float"},
    {"amount_usd": "-5", "note": "negative"},
    {"amount_usd": "0", "note": "zero"},
    {"amount_usd": "1e30", "note": "huge"},
    {"amount_usd": "1e999999999", "note": "beyond decimal's exponent"},
    {"amount_usd": "0.0000000001", "note": "below a nano-dollar"},
    {"amount_usd": "NaN", "note": "nan"},
    {"amount_usd": "1" * 5000, "note": "long"},
    {"amount_usd": "1.00"},
    {"amount_usd": "1.00", "note": "   "},
    {"amount_usd": "1.00", "note": "x" * 501},
    {"amount_usd": "1.00", "note": "bell\x07"},
    {"amount_usd": "1.00", "note": 7},
    {"amount_usd": "1.00", "note": "n", "operator_id": 1},
    [],
])
async def test_hostile_credit_and_debit_bodies_are_refused_in_words_and_change_nothing(
        gw: Gateway, config_path: Path, body: Any) -> None:
    op = await operator(gw, config_path, "op@example.com")
    target = await gw.components.accounts.create_account("t@example.com", None)
    for verb in ("credit", "debit"):
        status, payload, _ = await op.call("POST", f"/api/admin/accounts/{target}/{verb}",
                                           body)
        assert status == 400, (verb, payload)
        assert payload["error"]["message"].endswith(".") or "invalid amount" in \
            payload["error"]["message"]
    assert (await gw.components.accounts.get(target)).balance_nano == 0
    assert [r[1] for r in audit_rows(gw)] == ["grant_operator"]
    await op.http.close()


async def test_unknown_accounts_and_malformed_ids_are_404_and_oversized_bodies_413(
        gw: Gateway, config_path: Path) -> None:
    op = await operator(gw, config_path, "op@example.com")
    body = {"amount_usd": "1.00", "note": "n"}
    for ident in ("999999", "abc", "1" * 40, "-1", "%F0%9F%92%A5"):
        status, _, _ = await op.call("POST", f"/api/admin/accounts/{ident}/credit", body)
        assert status == 404, ident
        assert (await op.call("GET", f"/api/admin/accounts/{ident}"))[0] == 404
    assert (await op.call("POST", "/api/admin/keys/999999/revoke", {}))[0] == 404
    status, _, _ = await op.call("POST", "/api/admin/accounts/1/credit",
                                 {"amount_usd": "1.00", "note": "x" * 20_000})
    assert status == 413
    status, _, _ = await op.call("GET", "/api/admin/accounts?email=" + "a" * 300)
    assert status == 400
    assert (await op.call("GET", "/api/admin/accounts"))[0] == 400
    for q in ("limit=0", "limit=201", "limit=x", "before=0", "before=" + "9" * 30):
        assert (await op.call("GET", "/api/admin/audit?" + q))[0] == 400, q
    await op.http.close()


async def test_concurrent_debits_never_take_a_balance_below_zero(
        gw: Gateway, config_path: Path) -> None:
    op = await operator(gw, config_path, "op@example.com")
    target = await gw.components.accounts.create_account("t@example.com", None)
    await gw.components.accounts.credit(target, 5 * 10**9)
    results = await asyncio.gather(*(
        op.call("POST", f"/api/admin/accounts/{target}/debit",
                {"amount_usd": "1.00", "note": f"debit {i}"}) for i in range(12)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * 5 + [409] * 7
    refused = next(r[1] for r in results if r[0] == 409)
    assert "would make it negative" in refused["error"]["message"]
    assert (await gw.components.accounts.get(target)).balance_nano == 0
    assert [r[1] for r in audit_rows(gw)].count("debit") == 5
    await op.http.close()


async def test_a_debit_cannot_take_what_a_request_in_flight_has_reserved(
        gw: Gateway, config_path: Path) -> None:
    op = await operator(gw, config_path, "op@example.com")
    holder = Browser(gw)
    who = (await holder.signup("payer@example.com"))["account"]["id"]  # $1.00
    _, key = await holder.new_key()
    billing = gw.components.billing

    async def slow_stream() -> None:
        async with sdk(gw, key) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True,
                extra_headers={"x-mock-first-delay-ms": "800"})
            async for _ in stream:
                pass

    running = asyncio.create_task(slow_stream())
    for _ in range(500):  # until the request holds its reservation (5 s at most)
        if billing.snapshot(who)[2]:
            break
        await asyncio.sleep(0.01)
    reserved = billing.snapshot(who)[2]
    path = f"/api/admin/accounts/{who}/debit"
    status, refused, _ = await op.call("POST", path, {"amount_usd": "1.00", "note": "all"})
    assert status == 409, refused
    assert "reserved by requests in flight" in refused["error"]["message"]
    status, after, _ = await op.call("POST", path, {"amount_usd": "0.99", "note": "most"})
    assert status == 200 and after["balance_nano"] == 10**7
    await running
    assert await gw.components.usage.sync(5)
    with sqlite3.connect(gw.config.storage.path) as db:
        credited, charged, balance = db.execute(
            "SELECT credited_nano, charged_nano, balance_nano FROM accounts WHERE id = ?",
            (who,)).fetchone()
        rows = db.execute("SELECT SUM(cost_nano) FROM usage WHERE account_id = ?",
                          (who,)).fetchone()[0]
    assert 0 < charged == rows <= reserved and balance == credited - charged >= 0
    assert gw.components.usage.written_off_nano == 0
    await op.http.close()
    await holder.http.close()


# --- the other operator actions -------------------------------------------------------


async def test_find_disable_enable_revoke_and_limits_are_audited_and_take_effect(
        gw: Gateway, config_path: Path) -> None:
    op = await operator(gw, config_path, "op@example.com")
    holder = Browser(gw)
    who = (await holder.signup("found_me%@example.com"))["account"]["id"]
    key_id, key = await holder.new_key()
    assert await chat(gw, key)
    # LIKE's wildcards are plain characters in a search.
    status, found, _ = await op.call("GET", "/api/admin/accounts?email=d_me%25")
    assert status == 200 and [a["id"] for a in found["data"]] == [who]
    assert (await op.call("GET", "/api/admin/accounts?email=%25"))[1]["data"][0]["id"] == who
    status, found, _ = await op.call("GET", "/api/admin/accounts?email=_")
    assert [a["id"] for a in found["data"]] == [who]  # not op@example.com
    assert await gw.components.usage.sync(5)
    status, one, _ = await op.call("GET", f"/api/admin/accounts/{who}")
    assert one["usage"]["requests"] == 1 and one["keys"][0]["id"] == key_id
    assert one["usage"]["cost_nano"] == one["charged_nano"] > 0

    status, after, _ = await op.call("POST", f"/api/admin/accounts/{who}/limits",
                                     {"rpm": 7, "tpm": None, "note": "abuse"})
    assert status == 200 and after["limits"] == {"rpm": 7, "tpm": None, "max_concurrent": None}
    for bad in ({"rpm": 0}, {"rpm": 1.5}, {"rpm": True}, {"rpm": 10**12}, {"key_id": "1"},
                {"key_id": 999999, "rpm": 3}):
        status, _, _ = await op.call("POST", f"/api/admin/accounts/{who}/limits", bad)
        assert status in (400, 404), bad
    status, after, _ = await op.call("POST", f"/api/admin/accounts/{who}/disable",
                                     {"note": "unpaid"})
    assert after["status"] == "disabled"
    with pytest.raises(openai.PermissionDeniedError):
        for _ in range(40):
            await chat(gw, key)
            await asyncio.sleep(0.05)
    assert (await op.call("POST", f"/api/admin/accounts/{who}/enable", {}))[1][
        "status"] == "active"
    assert (await op.call("POST", f"/api/admin/keys/{key_id}/revoke",
                          {"note": "leaked"}))[0] == 204
    with pytest.raises(openai.AuthenticationError):
        for _ in range(40):
            await chat(gw, key)
            await asyncio.sleep(0.05)
    op_id = (await op.call("GET", "/api/account"))[1]["id"]
    rows = audit_rows(gw)
    assert rows[1:] == [
        (op_id, "set_limits", who, None, None, "rpm=7, tpm=default, max_concurrent=default; "
                                               "abuse"),
        (op_id, "disable_account", who, None, None, "unpaid"),
        (op_id, "enable_account", who, None, None, ""),
        (op_id, "revoke_key", who, key_id, None, "leaked")]
    status, log, _ = await op.call("GET", "/api/admin/audit?limit=2")
    assert [e["action"] for e in log["data"]] == ["revoke_key", "enable_account"]
    status, older, _ = await op.call("GET", f"/api/admin/audit?before={log['next_before']}")
    assert [e["action"] for e in older["data"]] == ["disable_account", "set_limits",
                                                    "grant_operator"]
    assert older["data"][-1]["operator_id"] is None  # the command line
    await op.http.close()
    await holder.http.close()


async def test_the_audit_table_holds_no_address_and_no_content(gw: Gateway) -> None:
    with sqlite3.connect(gw.config.storage.path) as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(audit)")}
    assert columns == {"id", "operator_id", "action", "target_account_id", "target_key_id",
                       "amount_nano", "note", "created_at"}


# --- the daily usage view ---------------------------------------------------------------


async def test_daily_usage_sums_tokens_and_cost_per_day_and_filters_by_key(gw: Gateway) -> None:
    holder = Browser(gw)
    await holder.signup("daily@example.com")
    k1, key1 = await holder.new_key(name="one")
    k2, key2 = await holder.new_key(name="two")
    for key in (key1, key1, key2):
        await chat(gw, key)
    assert await gw.components.usage.sync(5)
    status, daily, _ = await holder.call("GET", "/api/usage/daily")
    assert status == 200 and len(daily["data"]) == 1
    day = daily["data"][0]
    status, rows, _ = await holder.call("GET", "/api/usage")
    assert day["requests"] == 3
    assert day["total_tokens"] == sum(r["total_tokens"] for r in rows["data"])
    assert day["cost_nano"] == sum(r["cost_nano"] for r in rows["data"])
    status, only, _ = await holder.call("GET", f"/api/usage/daily?key_id={k2}")
    assert only["data"][0]["requests"] == 1
    status, listed, _ = await holder.call("GET", f"/api/usage?key_id={k1}")
    assert {r["key_id"] for r in listed["data"]} == {k1} and len(listed["data"]) == 2
    for q in ("key_id=x", "key_id=" + "9" * 30, "since=1970-01-01&until=2030-01-01",
              "since=banana"):
        assert (await holder.call("GET", "/api/usage/daily?" + q))[0] == 400, q
    await holder.http.close()

